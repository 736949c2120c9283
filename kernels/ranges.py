"""Turning calibration statistics into quantization ranges (rmin, rmax).

Every function returns Python floats with ``rmin <= 0 <= rmax`` so that zero
is exactly representable, and returns ``(0.0, 0.0)`` for empty or all-zero
data instead of NaN (the scale computation then picks a safe scale).
Histogram methods work on the exact grid of
:class:`~onnxopt.kernels.observers.HistogramObserver`; the outermost bins are
clipped to the exact data min/max so no range ever exceeds the data.
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np

from .observers import HistogramObserver, MinMaxObserver

__all__ = ["range_minmax", "range_percentile", "range_entropy", "range_mse"]


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    return float(min(lo, 0.0)), float(max(hi, 0.0))


@overload
def range_minmax(obs: HistogramObserver) -> tuple[float, float]: ...


@overload
def range_minmax(obs: MinMaxObserver) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]: ...


def range_minmax(
    obs: MinMaxObserver | HistogramObserver,
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Range from the exact min/max; per-channel observers give arrays of shape [C]."""
    if isinstance(obs, HistogramObserver):
        return (0.0, 0.0) if obs.count == 0 else _with_zero(obs.min, obs.max)
    if obs.min is None:
        return (0.0, 0.0)
    assert obs.max is not None  # min and max are set together
    lo = np.where(np.isfinite(obs.min), obs.min, 0.0)
    hi = np.where(np.isfinite(obs.max), obs.max, 0.0)
    if obs.axis is None:
        return _with_zero(float(lo), float(hi))
    return np.minimum(lo, 0.0), np.maximum(hi, 0.0)


def _signed_bins(hist: HistogramObserver) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of the histogram with the outer edges clipped to the data."""
    edges = hist.bin_edges()
    edges[0], edges[-1] = hist.min, hist.max
    return edges, hist.counts.astype(np.float64)


def _abs_bins(hist: HistogramObserver) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of |x| on the same nested grid, at most ``hist.max_bins`` bins.

    Grid bin k < 0 folds exactly onto |x| bin -k-1. The |x| histogram spans
    [0, absmax], which can be far wider than the data's own span (a tensor
    of values near 1000), so it moves up the grid until it fits.
    """
    k = np.arange(hist.offset, hist.offset + hist.counts.size, dtype=np.int64)
    j = np.where(k >= 0, k, -k - 1)
    shift = 0
    while (int(j.max()) >> shift) + 1 > hist.max_bins:
        shift += 1
    j = j >> shift
    counts = np.zeros(int(j.max()) + 1, dtype=np.float64)
    np.add.at(counts, j, hist.counts.astype(np.float64))
    edges = np.ldexp(np.arange(counts.size + 1, dtype=np.float64), hist.exponent + shift)
    edges[-1] = hist.absmax
    return edges, counts


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Value below which fraction ``q`` of the mass lies, interpolating inside a bin."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
    before = cum[j] - counts[j]
    frac = 0.0 if counts[j] == 0 else min(max((target - before) / counts[j], 0.0), 1.0)
    return float(edges[j] + frac * (edges[j + 1] - edges[j]))


def _is_degenerate(hist: HistogramObserver) -> bool:
    return hist.count == 0 or hist.absmax == 0.0


def range_percentile(
    hist: HistogramObserver, percentile: float = 99.99, symmetric: bool = False
) -> tuple[float, float]:
    """Clip at a percentile: of |x| when symmetric, else of each tail of x separately."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if _is_degenerate(hist):
        return (0.0, 0.0)
    q = percentile / 100.0
    if symmetric:
        t = _quantile(*_abs_bins(hist), q)
        return (-t, t)
    edges, counts = _signed_bins(hist)
    return _with_zero(_quantile(edges, counts, 1.0 - q), _quantile(edges, counts, q))


def _coarsen_to(edges: np.ndarray, counts: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Halve the resolution of an abs histogram (exactly, by pairs) until it has <= num_bins bins."""
    while counts.size > num_bins:
        n = counts.size
        padded = np.concatenate([counts, np.zeros(n % 2)])
        counts = padded.reshape(-1, 2).sum(axis=1)
        top = edges[-1]
        edges = edges[::2].copy() if n % 2 == 0 else np.append(edges[::2], top)
        edges[-1] = top
    return edges, counts


def _kl_threshold_bin(counts: np.ndarray, num_quant_bins: int) -> int:
    """TensorRT's search: the bin count i whose clipped distribution loses least information.

    For each candidate i the reference P is counts[:i] with all outliers added
    to its last bin; Q is counts[:i] merged into ``num_quant_bins`` groups and
    spread back evenly over the non-empty bins of each group. Returns the i
    with the smallest KL(P || Q) (the first one on ties).
    """
    n = counts.size
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])
    best_i, best_kl = n, math.inf
    for i in range(num_quant_bins, n + 1):
        h = counts[:i]
        p = h.copy()
        p[-1] += tail[i]
        nonzero = h > 0
        group = np.minimum(np.arange(i) // (i // num_quant_bins), num_quant_bins - 1)
        gsum = np.bincount(group, weights=h, minlength=num_quant_bins)
        gnz = np.bincount(group, weights=nonzero, minlength=num_quant_bins)
        q = np.where(nonzero, gsum[group] / np.maximum(gnz[group], 1.0), 0.0)
        psum, qsum = p.sum(), q.sum()
        if psum == 0 or qsum == 0:
            continue
        p, q = p / psum, q / qsum
        mask = p > 0
        if np.any(q[mask] == 0):
            continue
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def range_entropy(
    hist: HistogramObserver,
    num_quant_bins: int = 128,
    symmetric: bool = True,
    num_bins: int = 2048,
) -> tuple[float, float]:
    """TensorRT-style entropy calibration: the |x| threshold minimizing KL divergence.

    The |x| histogram is first coarsened exactly to at most ``num_bins`` bins
    (2048 as in TensorRT) to bound the search cost. Symmetric gives (-t, t);
    otherwise the threshold clips each side of the data: (max(min, -t), min(max, t)),
    so non-negative data gives (0, t).
    """
    if num_quant_bins < 2:
        raise ValueError("num_quant_bins must be at least 2")
    if _is_degenerate(hist):
        return (0.0, 0.0)
    edges, counts = _coarsen_to(*_abs_bins(hist), num_bins)
    t = hist.absmax
    if counts.size > num_quant_bins:
        t = float(min(edges[_kl_threshold_bin(counts, num_quant_bins)], hist.absmax))
    if symmetric:
        return (-t, t)
    return _with_zero(max(hist.min, -t), min(hist.max, t))


def range_mse(
    hist: HistogramObserver, bits: int = 8, symmetric: bool = True, num_candidates: int = 512
) -> tuple[float, float]:
    """Clip range minimizing the expected quantization MSE predicted from the histogram.

    Candidates shrink the min/max range by factors k/num_candidates. Each bin's
    mass sits at its center; values inside the range cost the uniform rounding
    noise step**2/12, values outside cost their squared distance to the clip.
    Step is t / (2**(bits-1) - 1) for symmetric (narrow signed) ranges and
    (rmax - rmin) / (2**bits - 1) otherwise. Prefix sums make every candidate O(1).
    """
    if _is_degenerate(hist):
        return (0.0, 0.0)
    edges, counts = _signed_bins(hist)
    centers = 0.5 * (edges[:-1] + edges[1:])
    zero = np.zeros(1)
    n_cum = np.concatenate([zero, np.cumsum(counts)])
    s1_cum = np.concatenate([zero, np.cumsum(counts * centers)])
    s2_cum = np.concatenate([zero, np.cumsum(counts * centers * centers)])

    alpha = np.arange(1, num_candidates + 1, dtype=np.float64) / num_candidates
    if symmetric:
        lo, hi = -alpha * hist.absmax, alpha * hist.absmax
        step = hi / (2 ** (bits - 1) - 1)
    else:
        lo0, hi0 = _with_zero(hist.min, hist.max)
        lo, hi = alpha * lo0, alpha * hi0
        step = (hi - lo) / (2**bits - 1)
    i_lo = np.searchsorted(centers, lo, side="left")
    i_hi = np.searchsorted(centers, hi, side="right")
    below = s2_cum[i_lo] - 2 * lo * s1_cum[i_lo] + lo * lo * n_cum[i_lo]
    above = (s2_cum[-1] - s2_cum[i_hi]) - 2 * hi * (s1_cum[-1] - s1_cum[i_hi]) + hi * hi * (n_cum[-1] - n_cum[i_hi])
    inside = (n_cum[i_hi] - n_cum[i_lo]) * step * step / 12.0
    cost = np.maximum(below, 0.0) + np.maximum(above, 0.0) + inside
    best = int(np.argmin(cost))
    return _with_zero(float(lo[best]), float(hi[best]))
