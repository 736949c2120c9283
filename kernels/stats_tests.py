"""Confidence intervals for latency comparisons: is one form faster than another beyond the noise?

Timings on a shared machine are noisy and the noise is not normal (a busy neighbour adds long
stalls), so the interval is distribution-free: the median of paired per-repetition ratios with
the order-statistic (sign-test) interval, which needs only that the ratios of the repetitions
are independent draws around one median.
"""

from __future__ import annotations

import math

import numpy as np


def median_rank_bounds(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the sorted sample whose values bound the median with at least
    `confidence` (two-sided sign-test interval); None when n samples are too few for it."""
    if n < 1:
        return None
    alpha = 1.0 - confidence
    total = 2.0**n
    tail = 0.0
    k = -1  # largest k with P(Binomial(n, 1/2) <= k) <= alpha / 2
    for i in range(n + 1):
        tail += math.comb(n, i) / total
        if tail > alpha / 2:
            break
        k = i
    if k < 0:
        return None
    return k, n - 1 - k


def ratio_interval(base: np.ndarray, cand: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high) of the paired ratios cand[i] / base[i] of interleaved repetitions.

    The bounds are the order-statistic interval of the median; with too few repetitions for
    `confidence` they are the smallest and largest ratio widened to (0, inf), so no decision
    follows from them."""
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1 or b.size == 0:
        raise ValueError(f"need two equal-length 1-d samples, got {b.shape} and {c.shape}")
    ratios = np.sort(c / np.maximum(b, np.finfo(np.float64).tiny))
    mid = float(np.median(ratios))
    ranks = median_rank_bounds(ratios.size, confidence)
    if ranks is None:
        return mid, 0.0, math.inf
    return mid, float(ratios[ranks[0]]), float(ratios[ranks[1]])
