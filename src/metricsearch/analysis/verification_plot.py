"""Drawing and tabulating the verification curve (ROC and DET) of an evaluation."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from metricsearch.metrics.verification import VerificationCurve

__all__ = ["plot_verification_curve", "verification_rows"]


def plot_verification_curve(curve: VerificationCurve, title: str = "") -> Figure:
    """Two panels: the DET curve (FNMR against FMR on a log axis) with the exact operating points marked, and the
    ROC curve (true match rate against FMR)."""
    figure = Figure(figsize=(11, 4.6))
    det, roc = figure.subplots(1, 2)
    floor = 0.5 / curve.num_impostor  # the smallest non-zero FMR is 1 / impostors: zero sits just below it
    fmr = np.maximum(curve.fmr, floor)
    det.step(fmr, curve.fnmr, where="post", color="tab:blue")
    colours = ("tab:red", "tab:orange", "tab:purple", "tab:brown")
    for number, point in enumerate(curve.operating_points):
        colour = colours[number % len(colours)]
        label = f"FNMR {100 * point['fnmr']:.1f}% at FMR {point['fmr_target']:g}"
        det.plot(max(point["fmr"], floor), point["fnmr"], "o", color=colour, label=label)
    if curve.operating_points:
        det.legend(fontsize=8, loc="lower left")
    det.set(xscale="log", xlabel="false match rate (FMR)", ylabel="false non-match rate (FNMR)", ylim=(0, 1.02))
    det.set_title("DET", fontsize=10)
    det.grid(True, which="both", alpha=0.3)
    roc.step(fmr, 1.0 - curve.fnmr, where="post", color="tab:green")
    roc.set(xscale="log", xlabel="false match rate (FMR)", ylabel="true match rate (1 - FNMR)", ylim=(0, 1.02))
    roc.set_title("ROC", fontsize=10)
    roc.grid(True, which="both", alpha=0.3)
    pairs = f"{curve.num_genuine:,} genuine and {curve.num_impostor:,} impostor pairs"
    figure.suptitle(f"{title}: {pairs}" if title else pairs, fontsize=10)
    figure.tight_layout()
    return figure


def verification_rows(curve: VerificationCurve) -> list[dict[str, float]]:
    """One row per curve point: threshold, FMR, FNMR (accepted: score >= threshold)."""
    return [
        {"threshold": float(t), "fmr": float(a), "fnmr": float(b)}
        for t, a, b in zip(curve.thresholds, curve.fmr, curve.fnmr, strict=True)
    ]
