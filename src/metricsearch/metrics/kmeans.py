"""k-means for NMI: faiss on the CPU, a torch implementation on GPUs, and a cost budget for large class counts.

NMI clusters the evaluation set into one cluster per class. Its cost is ``N * C * D`` multiply-adds per Lloyd
iteration, which grows with the square of the dataset for datasets of small classes: at SOP test size (60,502 x 512,
11,316 classes) one iteration is 3.5e11 multiply-adds, and the customary 20 iterations x 5 runs would take ~13
minutes on two CPU cores (faiss; 7.7 s per iteration in ``results/benchmark/avx2/benchmark.json``), against a
fraction of a second for every other metric. faiss-cpu has no GPU k-means, so on a GPU the iterations run in torch
(:func:`torch_kmeans`), where the same work takes seconds.

:func:`nmi_schedule` makes the cost a decision: the runs, then the iterations, are reduced to fit a budget, and
NMI is skipped (with the reason logged) when even the smallest schedule does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The CPU budget of conf/train.yaml's module.nmi_max_macs: ~5-10 s of faiss k-means on two cores.
DEFAULT_NMI_MAX_MACS = 2.0e11
# Fewer iterations than this do not converge well enough for NMI to mean anything: skip instead.
MIN_ITERATIONS = 5


@dataclass(frozen=True)
class KMeansSchedule:
    """How many Lloyd iterations and independent runs (the best objective is kept) to spend."""

    niter: int
    nredo: int


def kmeans_cost(num_items: int, num_clusters: int, dim: int, schedule: KMeansSchedule) -> float:
    """Multiply-adds of the assignment steps of ``schedule`` (the centroid updates are negligible)."""
    return float(num_items) * num_clusters * dim * schedule.niter * schedule.nredo


def nmi_schedule(
    num_items: int, num_clusters: int, dim: int, wanted: KMeansSchedule, max_macs: float | None
) -> KMeansSchedule | None:
    """The largest schedule within ``max_macs`` multiply-adds: fewer runs first, then fewer iterations.

    Returns ``wanted`` when it fits (or when there is no budget), and None when not even one run of
    :data:`MIN_ITERATIONS` iterations fits: NMI is then not computed.

    Example:
        >>> nmi_schedule(60_502, 11_316, 512, KMeansSchedule(20, 5), 2e11) is None  # SOP test set on a CPU
        True
        >>> nmi_schedule(8_131, 98, 512, KMeansSchedule(20, 5), 2e11)  # Cars196: the full schedule
        KMeansSchedule(niter=20, nredo=5)
    """
    if max_macs is None or kmeans_cost(num_items, num_clusters, dim, wanted) <= max_macs:
        return wanted
    per_iteration = kmeans_cost(num_items, num_clusters, dim, KMeansSchedule(1, 1))
    affordable = int(max_macs // per_iteration) if per_iteration > 0 else wanted.niter * wanted.nredo
    if affordable < min(MIN_ITERATIONS, wanted.niter):
        return None
    if affordable >= wanted.niter:
        return KMeansSchedule(wanted.niter, min(wanted.nredo, affordable // wanted.niter))
    return KMeansSchedule(affordable, 1)


def torch_kmeans(
    x: torch.Tensor, num_clusters: int, schedule: KMeansSchedule, seed: int = 0, chunk: int = 8192
) -> torch.Tensor:
    """Lloyd's k-means with squared L2 distances, on whatever device ``x`` is; returns each row's cluster.

    As faiss does: each run starts from ``num_clusters`` distinct rows drawn at random, and the run with the lowest
    objective (sum of squared distances) is kept. A cluster left empty takes over the row farthest from its
    centroid, so that every run ends with ``num_clusters`` clusters in use where the data allows.
    """
    x = x.to(torch.float32)
    num_items = len(x)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sq_norms = (x * x).sum(dim=1)
    best_assignment, best_objective = None, float("inf")
    for _ in range(schedule.nredo):
        start = torch.randperm(num_items, generator=generator)[:num_clusters].to(x.device)
        centroids = x[start].clone()
        for iteration in range(schedule.niter + 1):
            assignment, distances = _assign(x, sq_norms, centroids, chunk)
            if iteration == schedule.niter:
                break
            sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
            sizes = torch.bincount(assignment, minlength=num_clusters)
            empty = torch.nonzero(sizes == 0).flatten()
            centroids = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None].to(x.dtype), centroids)
            if len(empty):
                farthest = torch.topk(distances, min(len(empty), num_items)).indices
                centroids[empty[: len(farthest)]] = x[farthest]
        objective = float(distances.sum())
        if objective < best_objective:
            best_assignment, best_objective = assignment, objective
    return best_assignment


def _assign(
    x: torch.Tensor, sq_norms: torch.Tensor, centroids: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row and the squared distance to it, ``chunk`` rows at a time."""
    centroid_sq = (centroids * centroids).sum(dim=1)
    assignment = torch.empty(len(x), dtype=torch.int64, device=x.device)
    distances = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for begin in range(0, len(x), chunk):
        part = x[begin : begin + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the row's own norm does not change which centroid is nearest.
        scores = torch.addmm(centroid_sq, part, centroids.T, beta=1, alpha=-2)
        nearest, index = scores.min(dim=1)
        assignment[begin : begin + chunk] = index
        distances[begin : begin + chunk] = (nearest + sq_norms[begin : begin + chunk]).clamp(min=0)
    return assignment, distances


def faiss_kmeans(x: np.ndarray, num_clusters: int, schedule: KMeansSchedule, seed: int = 0) -> np.ndarray:
    """faiss' k-means on the CPU; returns each row's cluster."""
    import faiss

    # NOTE: min_points_per_centroid=1 silences faiss' warning about few points per cluster, which is the normal
    # case here (a CUB class has ~60 images).
    kmeans = faiss.Kmeans(
        x.shape[1],
        num_clusters,
        niter=schedule.niter,
        nredo=schedule.nredo,
        seed=seed,
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return assignment[:, 0]
