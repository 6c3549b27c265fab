"""The screening product of the CPU evaluation: its arithmetic, its error bound, and which one to use.

:mod:`metricsearch.metrics.positive_ranks` computes every block of the similarity matrix only to *screen* pairs:
a pair is rescored exactly when its screening score may lie within the product's worst-case error of a query's
threshold. The product runs in int8 (exact int32 sums of codes on one scale) or bfloat16 where the CPU multiplies
them fast (VNNI, AVX512-BF16, AMX), else in float32. This module holds the arithmetic of each (operands, product,
:func:`screen_margin`, :func:`screen_keys`) and the choice between them: :func:`measure_screens` times and checks
each product on this CPU, :func:`pick_screen` decides on those numbers, :func:`choose_screen` does both once per
process.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SCREENS",
    "ScreenProbe",
    "choose_screen",
    "int8_codes",
    "int8_product_is_exact",
    "int8_scale",
    "measure_screens",
    "measured_screens",
    "resolve_screen",
    "pick_screen",
    "screen_is_fast",
    "screen_keys",
    "screen_margin",
]

# Arithmetic of the CPU's screening product; "auto" takes the fastest that is measured to stay within its margin.
SCREENS = ("auto", "int8", "bfloat16", "float32")
SCREEN_ROUNDOFF = {"bfloat16": 2.0**-8, "float32": 0.0}  # unit roundoff of the screen's inputs
# Rows converted to int8 codes at once (float temporaries of the whole matrix would raise the peak memory).
CODE_CHUNK = 4096


def screen_margin(precision: str, x: np.ndarray, other: np.ndarray | None = None) -> float:
    """How far a screening score can lie from the exact score of the same pair, at most.

    ``other`` holds the right-hand rows where they are not ``x``'s own (queries searched in a separate gallery):
    the bound then takes the largest norms of both, and the int8 codes their common scale (``int8_scale(x, other)``).

    For rows of norm at most nu and unit roundoff u of the screen's inputs (2^-8 for bfloat16, 0 for float32),
    rounding the inputs moves each product x_k y_k by at most (2u + u^2)|x_k y_k|, and sum_k |x_k y_k| <= nu^2
    (Cauchy-Schwarz). Summing D products in float32, in any order, adds at most gamma = D 2^-24 / (1 - D 2^-24)
    times the same sum; a bfloat16 result is rounded once more (u |s|). The exact score is itself a float32 sum
    (another gamma nu^2). The bound is widened by 1% and applies whatever the order or blocking of the product.

    int8 codes ``q = round(x / s)`` share one scale ``s`` (:func:`int8_scale`) and are multiplied exactly in int32:
    with ``x = s q + e``, ``|e_k| <= s / 2``, the product ``s^2 q_x . q_y`` differs from ``x . y`` by at most
    ``(s / 2)(|x|_1 + |y|_1) + (3/4) D s^2``, bounded with the largest L1 norm of the rows.
    """
    dim = x.shape[1]
    matrices = [x] if other is None else [x, other]
    nu_sq = max(float(np.max(np.einsum("ij,ij->i", m, m, dtype=np.float64))) if len(m) else 0.0 for m in matrices)
    gamma = dim * 2.0**-24 / (1.0 - dim * 2.0**-24)
    if precision == "int8":
        scale = int8_scale(x, other)
        l1 = max(float(np.abs(m).sum(axis=1, dtype=np.float64).max()) if len(m) else 0.0 for m in matrices)
        return 1.01 * (scale * l1 + 0.75 * dim * scale * scale + gamma * nu_sq) + 1e-30
    u = SCREEN_ROUNDOFF[precision]
    bound = (2 * u + u * u) + gamma * (1 + u) ** 2 + u * (1 + u) ** 2 * (1 + gamma) + gamma
    return 1.01 * bound * max(nu_sq, 1e-30)


def int8_scale(x: np.ndarray, other: np.ndarray | None = None) -> float:
    """The scale of the int8 screen's codes: the largest magnitude (of ``x``, and of ``other`` if given) maps to 127."""
    largest = max(float(np.abs(m).max()) if m.size else 0.0 for m in ([x] if other is None else [x, other]))
    return largest / 127.0 if largest > 0 else 1.0


def screen_keys(limits: np.ndarray, margin: float, precision: str, scale: float = 1.0) -> np.ndarray:
    """Keys such that every pair whose exact score reaches ``limits`` has a screening key at least as large.

    A float32 screen is compared as it is, against the limit lowered by the margin. bfloat16 scores are compared
    as order-preserving integers (their bits, with the magnitude bits of negative numbers flipped): the lowered
    limit is truncated to bfloat16 (toward zero) and lowered by one more step. int8 products are integers on the
    scale ``scale^2``: the lowered limit is divided by it and rounded down, minus one. All can only admit more pairs.
    An infinite limit (a finished query) admits nothing.
    """
    if precision == "int8":
        low = np.floor((limits.astype(np.float64) - margin) / (scale * scale)) - 1
        never = np.iinfo(np.int32).max
        return np.clip(low, -never, never).astype(np.int32)  # an infinite limit clips to `never`
    finished = np.isposinf(limits)
    low = np.nextafter((limits.astype(np.float64) - margin).astype(np.float32), np.float32(-np.inf))
    if precision == "float32":
        return np.where(finished, np.float32(np.inf), low)
    bits = low.view(np.int32) >> 16  # the bfloat16 with the upper half of the float32's bits
    keys = (bits ^ ((bits >> 15) & 0x7FFF)) - 1
    return np.where(finished, np.iinfo(np.int32).max, keys).astype(np.int32)


def int8_codes(x: np.ndarray, scale: float) -> torch.Tensor:
    """The int8 codes of the rows: ``round(x / scale)``, within [-127, 127] by the choice of the scale.

    Converted a few thousand rows at a time: float temporaries of the whole matrix would raise the peak memory.
    """
    codes = np.empty(x.shape, dtype=np.int8)
    for start in range(0, len(x), CODE_CHUNK):
        part = np.rint(x[start : start + CODE_CHUNK] / np.float32(scale))
        codes[start : start + CODE_CHUNK] = np.clip(part, -127, 127, out=part)
    return torch.from_numpy(codes)


def screen_operands(precision: str, x: np.ndarray, scale: float) -> tuple[torch.Tensor, torch.dtype]:
    """The rows in the screen's arithmetic, and the dtype of its products."""
    if precision == "int8":
        return int8_codes(x, scale), torch.int32
    if precision == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16), torch.bfloat16
    return torch.from_numpy(x), torch.float32


def screen_product(precision: str, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor) -> None:
    """``left @ right.T`` into ``out`` in the screen's arithmetic (operands already in its dtype)."""
    if precision == "int8":
        torch._int_mm(left, right.T, out=out)  # exact int32 sums; the transposed view is its fast layout
    else:
        # NOTE: torch's BLAS, not numpy's OpenBLAS, for float32 too: OpenBLAS's sgemm was 5% faster on this AMD CPU,
        # but its threads keep spinning after each product and took the cores from the counting kernel that follows
        # (3.3 s instead of 1.5 s at SOP size): 14.7 s in all against 12.9 s.
        torch.mm(left, right.T, out=out)


@dataclass(frozen=True)
class ScreenProbe:
    """One screen's product measured on probe vectors: its time, its largest error, and the margin it must meet.

    Attributes:
        seconds: Best of three products of a 1024 x 2048 block (``inf`` where this build of torch lacks it).
        error: Largest distance of a product from the exact (float64) score, in score units.
        margin: :func:`screen_margin` for the probe vectors: the error the screen's keys assume.
    """

    seconds: float
    error: float
    margin: float

    @property
    def accurate(self) -> bool:
        return self.error <= self.margin


# A screen other than float32 is used only when it multiplies at least this much faster: an emulated bfloat16 or
# int8 product (AVX2-only CPUs) is slower than float32, and a screen with a wider margin rescores more pairs.
SCREEN_MIN_SPEEDUP = 1.5


def pick_screen(probes: dict[str, ScreenProbe]) -> str:
    """The screen to use given each one's measurement: bfloat16, else int8, where fast and accurate; else float32.

    A decision on given numbers (what :func:`measure_screens` returns), so that it can be checked on any machine.
    """
    # NOTE: bfloat16 first: its margin is about a third of int8's, so fewer pairs are rescored. At SOP size on a CPU
    # with both (AVX512-BF16 + VNNI) the two took 4.2-6.4 s each over three runs, although int8 multiplies 2x faster.
    for precision in ("bfloat16", "int8"):
        if screen_is_fast(probes, precision):
            return precision
    return "float32"


def screen_is_fast(probes: dict[str, ScreenProbe], precision: str) -> bool:
    """Whether ``precision`` was measured, stays within its margin, and beats float32 by :data:`SCREEN_MIN_SPEEDUP`.

    False means the CPU emulates it (or this build of torch lacks it): forcing it would only be slower.
    """
    if precision == "float32":
        return True
    probe = probes.get(precision)
    return probe is not None and probe.accurate and probe.seconds * SCREEN_MIN_SPEEDUP < probes["float32"].seconds


def measure_screens(dim: int) -> dict[str, ScreenProbe]:
    """Times each screen's product on blocks of 1024 x 2048 unit vectors of ``dim`` values, and measures its error.

    bfloat16 (AVX512-BF16, AMX) and int8 (VNNI) are fast only where the CPU has them; elsewhere torch emulates them.
    A screen whose product this build of torch lacks on the CPU is left out.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(1024, dim, generator=generator), dim=1)
    b = torch.nn.functional.normalize(torch.randn(2048, dim, generator=generator), dim=1)
    both = torch.cat([a, b]).numpy()
    exact = a.double() @ b.double().T
    probes = {}
    for precision in ("float32", "bfloat16", "int8"):
        scale = int8_scale(both) if precision == "int8" else 1.0
        operands, out_dtype = screen_operands(precision, both, scale)
        left, right = operands[:1024], operands[1024:]
        out = torch.empty(1024, 2048, dtype=out_dtype)
        try:
            screen_product(precision, left, right, out)  # the first call also selects kernels and compiles them
        except RuntimeError:  # an operation this build of torch lacks on the CPU
            continue
        error = float((out.double() * (scale * scale) - exact).abs().max())
        if precision == "int8" and not int8_product_is_exact(dim):
            error = float("inf")  # it saturates or rounds somewhere: the margin, derived for exact sums, does not hold
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            screen_product(precision, left, right, out)
            best = min(best, time.perf_counter() - started)
        probes[precision] = ScreenProbe(seconds=best, error=error, margin=screen_margin(precision, both))
    return probes


def int8_product_is_exact(dim: int) -> bool:
    """Whether torch's int8 product gives exact int32 sums here, on the codes most likely to break it.

    With the dispatch limited to AVX2, torch's int8 product pairs u8 x s8 products in 16-bit lanes, which saturate:
    on full-range codes it was off by up to 8 million (of sums up to 8.3 million at 512 values). Random unit vectors
    rarely reach such codes, so the check uses full-range random codes and rows of all +-127.
    """
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (64, dim), generator=generator).to(torch.int8)
    b = torch.randint(-127, 128, (128, dim), generator=generator).to(torch.int8)
    a[0], a[1], b[0], b[1] = 127, -127, 127, -127
    out = torch.empty(64, 128, dtype=torch.int32)
    screen_product("int8", a, b, out)
    exact = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64).T
    return bool(np.array_equal(out.numpy().astype(np.int64), exact))


@functools.lru_cache(maxsize=8)
def measured_screens(dim: int) -> dict[str, ScreenProbe]:
    """:func:`measure_screens`, once per process and dimension."""
    return measure_screens(dim)


def choose_screen(dim: int) -> str:
    """The screen for rows of ``dim`` values on this CPU (measured once per process and dimension)."""
    return pick_screen(measured_screens(dim))


def resolve_screen(screen: str, dim: int, probes: dict[str, ScreenProbe] | None = None) -> str:
    """The screen to run: for ``"auto"`` the one :func:`choose_screen` picks; a forced screen where it is correct.

    A forced bfloat16 or int8 screen whose product this CPU does not compute within its margin (int8 saturating
    under AVX2, say) would make the metrics wrong: float32 runs instead, with a warning.
    """
    if screen == "auto":
        return pick_screen(probes) if probes is not None else choose_screen(dim)
    if screen == "float32":
        return screen
    probe = (probes if probes is not None else measured_screens(dim)).get(screen)
    if probe is None or not probe.accurate:
        warnings.warn(
            f"the {screen} screen is not computed within its error bound on this CPU (its product "
            f"{'is missing' if probe is None else 'is inexact'}): using float32, so the metrics stay exact",
            RuntimeWarning,
            stacklevel=3,
        )
        return "float32"
    return screen
