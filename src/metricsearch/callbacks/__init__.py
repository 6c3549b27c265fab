"""Lightning callbacks for tracking runs: throughput, config and checkpoint logging, embedding pictures."""

from metricsearch.callbacks.run_tracking import RunTrackingCallback, log_checkpoint_artifact
from metricsearch.callbacks.throughput import ThroughputCallback
from metricsearch.callbacks.visualization import VisualizationCallback

__all__ = ["RunTrackingCallback", "ThroughputCallback", "VisualizationCallback", "log_checkpoint_artifact"]
