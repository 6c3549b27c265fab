"""Lightning callbacks for tracking runs: throughput, config and checkpoint logging, loss curve, embedding pictures."""

from metricsearch.callbacks.loss_curve import LossCurveCallback
from metricsearch.callbacks.run_tracking import RunTrackingCallback, log_checkpoint_artifact
from metricsearch.callbacks.throughput import ThroughputCallback
from metricsearch.callbacks.visualization import VisualizationCallback

__all__ = [
    "LossCurveCallback",
    "RunTrackingCallback",
    "ThroughputCallback",
    "VisualizationCallback",
    "log_checkpoint_artifact",
]
