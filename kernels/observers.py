"""Streamed, mergeable statistics of activation tensors for calibration.

Every observer is built sample by sample in bounded memory, and two observers
that saw disjoint data merge into exactly the state of one observer that saw
all of it, whatever the order of updates and merges and the shapes of the
batches. That lets calibration split work across processes and keeps memory
flat as the sample count grows.

Non-finite values (NaN, +-inf) are never binned or used for min/max; they are
counted in ``nonfinite`` so a caller can report them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MinMaxObserver", "HistogramObserver"]


def _finite_f64(x: Any) -> tuple[np.ndarray, int]:
    """Return the finite values of ``x`` flattened as float64 and the number dropped."""
    a = np.asarray(x, dtype=np.float64).ravel()
    finite = np.isfinite(a)
    if finite.all():
        return a, 0
    return a[finite], int(a.size - np.count_nonzero(finite))


def _none_if_inf(v: float) -> float | None:
    return None if math.isinf(v) else float(v)


class MinMaxObserver:
    """Running minimum and maximum, per tensor or per channel along ``axis``.

    ``-0.0`` is stored as ``0.0`` so that states compare bit-identically
    whatever the update order. An observer that saw no finite value has
    ``min=+inf`` and ``max=-inf`` (``None`` in ``to_dict``).
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.count = 0
        self.nonfinite = 0
        self.min: np.ndarray | None = None if axis is not None else np.array(np.inf)
        self.max: np.ndarray | None = None if axis is not None else np.array(-np.inf)

    @property
    def channels(self) -> int | None:
        """Number of channels, or None for per-tensor (or not yet updated) observers."""
        return None if self.axis is None or self.min is None else int(self.min.shape[0])

    def update(self, x: np.ndarray) -> MinMaxObserver:
        """Fold one batch into the running statistics; returns ``self``."""
        a = np.asarray(x, dtype=np.float64)
        if self.axis is None:
            vals, bad = _finite_f64(a)
            self.nonfinite += bad
            self.count += int(vals.size)
            if vals.size:
                assert self.min is not None and self.max is not None  # per-tensor bounds start at +-inf
                self.min = np.minimum(self.min, vals.min() + 0.0)
                self.max = np.maximum(self.max, vals.max() + 0.0)
            return self
        if a.ndim == 0:
            raise ValueError("per-channel MinMaxObserver needs at least a 1-D tensor")
        rows = np.moveaxis(a, self.axis, 0).reshape(a.shape[self.axis], -1)
        if self.min is not None and rows.shape[0] != self.min.shape[0]:
            raise ValueError(f"channel count changed along axis {self.axis}: {self.min.shape[0]} -> {rows.shape[0]}")
        finite = np.isfinite(rows)
        self.nonfinite += int(rows.size - np.count_nonzero(finite))
        self.count += int(rows.shape[1])
        lo = np.where(finite, rows, np.inf).min(axis=1, initial=np.inf) + 0.0
        hi = np.where(finite, rows, -np.inf).max(axis=1, initial=-np.inf) + 0.0
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)
        return self

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        """Fold another observer's statistics into this one; returns ``self``."""
        if other.axis != self.axis:
            raise ValueError(f"cannot merge observers with axis {self.axis} and {other.axis}")
        self.count += other.count
        self.nonfinite += other.nonfinite
        if other.min is None:
            return self
        assert other.max is not None  # min and max are set together
        if self.min is None:
            self.min, self.max = other.min.copy(), other.max.copy()
            return self
        assert self.max is not None  # min and max are set together
        if self.min.shape != other.min.shape:
            raise ValueError(f"cannot merge {self.min.shape[0]} channels with {other.min.shape[0]}")
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable state (infinite bounds of empty data become None)."""

        def conv(v: np.ndarray | None) -> Any:
            if v is None:
                return None
            if v.ndim == 0:
                return _none_if_inf(float(v))
            return [_none_if_inf(float(e)) for e in v]

        return {
            "kind": "minmax",
            "axis": self.axis,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "min": conv(self.min),
            "max": conv(self.max),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MinMaxObserver:
        """Rebuild an observer from :meth:`to_dict` output."""
        obs = cls(axis=d["axis"])
        obs.count = int(d["count"])
        obs.nonfinite = int(d["nonfinite"])

        def back(v: Any, empty: float) -> np.ndarray | None:
            if v is None and obs.axis is not None:
                return None
            if isinstance(v, list):
                return np.array([empty if e is None else e for e in v], dtype=np.float64)
            return np.array(empty if v is None else v, dtype=np.float64)

        obs.min = back(d["min"], np.inf)
        obs.max = back(d["max"], -np.inf)
        return obs

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MinMaxObserver):
            return NotImplemented
        same_arrays = all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in ((self.min, other.min), (self.max, other.max))
        )
        return (
            self.axis == other.axis and self.count == other.count and self.nonfinite == other.nonfinite and same_arrays
        )

    def __repr__(self) -> str:
        return f"MinMaxObserver(axis={self.axis}, count={self.count}, min={self.min}, max={self.max})"


_MAX_INDEX = 2.0**52


class HistogramObserver:
    """Histogram on a global power-of-two grid that merges exactly.

    Bin ``k`` covers ``[k * 2**e, (k + 1) * 2**e)``. The state is canonical: the
    exponent ``e`` is the smallest one (not below ``min_exponent``) for which
    the bins between the data minimum and maximum number at most ``max_bins``
    and every bin index fits comfortably in int64. Grids with exponents ``e``
    and ``e + 1`` are nested (bin ``k`` lies inside bin ``k // 2``), so moving
    counts to a coarser grid only sums adjacent bins and is exact. Since the
    canonical exponent depends only on the data minimum and maximum, any
    sequence of updates and merges over the same multiset of values reaches
    bit-identical state: memory is at most ``max_bins`` int64 counts.

    Also tracks the exact min, max, count and abs-max.
    """

    def __init__(self, max_bins: int = 4096, min_exponent: int = -64) -> None:
        if max_bins < 2:
            raise ValueError("max_bins must be at least 2")
        self.max_bins = int(max_bins)
        self.min_exponent = int(min_exponent)
        self.exponent = self.min_exponent
        self.offset = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.count = 0
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf

    @property
    def absmax(self) -> float:
        """Largest absolute finite value seen (0.0 when empty)."""
        return 0.0 if self.count == 0 else max(-self.min, self.max)

    @property
    def bin_width(self) -> float:
        """Width of every bin, ``2**exponent``."""
        return math.ldexp(1.0, self.exponent)

    def bin_edges(self) -> np.ndarray:
        """The ``len(counts) + 1`` bin edges on the grid (the outer ones may lie beyond min/max)."""
        k = np.arange(self.offset, self.offset + self.counts.size + 1, dtype=np.float64)
        with np.errstate(over="ignore"):
            return np.ldexp(k, self.exponent)

    @staticmethod
    def _index(x: np.ndarray, e: int) -> np.ndarray:
        """Exact ``floor(x / 2**e)`` as float64 (scaling by a power of two is exact)."""
        k = np.floor(np.ldexp(x, -e))
        # a negative value that underflows to -0.0 still belongs to bin -1
        k[(k == 0) & (x < 0)] = -1.0
        return k

    def _fits(self, lo: float, hi: float, e: int) -> bool:
        klo, khi = self._index(np.array([lo, hi]), e)
        return khi - klo + 1 <= self.max_bins and max(abs(klo), abs(khi)) <= _MAX_INDEX

    def _canonical_exponent(self, lo: float, hi: float, start: int) -> int:
        """Smallest exponent >= ``start`` whose grid holds [lo, hi]; ``start`` must be a lower bound."""
        e = max(start, self.min_exponent)
        if hi > lo:
            e = max(e, math.floor(math.log2(hi / self.max_bins - lo / self.max_bins)) - 2)
        amax = max(-lo, hi)
        if amax > 0:
            e = max(e, math.floor(math.log2(amax)) - 55)
        while not self._fits(lo, hi, e):
            e += 1
        return e

    @staticmethod
    def _coarsen(offset: int, counts: np.ndarray, shift: int) -> tuple[int, np.ndarray]:
        """Move counts ``shift`` levels up the nested grid by summing aligned bins."""
        if shift == 0 or counts.size == 0:
            return offset, counts
        idx = np.right_shift(np.arange(offset, offset + counts.size, dtype=np.int64), min(shift, 63))
        starts = np.flatnonzero(np.diff(idx, prepend=idx[0] - 1))
        return int(idx[0]), np.add.reduceat(counts, starts)

    def _absorb(self, offset: int, counts: np.ndarray, e: int, lo: float, hi: float) -> None:
        """Add counts given on grid ``e`` (a lower bound of the result's exponent) to this state."""
        empty = self.count == 0
        new_lo = lo if empty else min(self.min, lo)
        new_hi = hi if empty else max(self.max, hi)
        start = e if empty else max(e, self.exponent)
        target = self._canonical_exponent(new_lo, new_hi, start)
        offset, counts = self._coarsen(offset, counts, target - e)
        own_offset, own_counts = self._coarsen(self.offset, self.counts, target - self.exponent)
        klo, khi = self._index(np.array([new_lo, new_hi]), target).astype(np.int64)
        merged = np.zeros(int(khi - klo + 1), dtype=np.int64)
        merged[offset - klo : offset - klo + counts.size] += counts
        if own_counts.size:
            merged[own_offset - klo : own_offset - klo + own_counts.size] += own_counts
        self.exponent, self.offset, self.counts = target, int(klo), merged
        self.min, self.max = new_lo, new_hi

    def update(self, x: np.ndarray) -> HistogramObserver:
        """Fold one batch (any shape) into the histogram; returns ``self``."""
        if (
            isinstance(x, np.ndarray)
            and x.dtype == np.float32
            and x.size
            and self.max_bins <= 2**22
            and self._update_float32(x)
        ):
            return self
        vals, bad = _finite_f64(x)
        self.nonfinite += bad
        if vals.size == 0:
            return self
        lo, hi = float(vals.min()) + 0.0, float(vals.max()) + 0.0
        start = self.min_exponent if self.count == 0 else self.exponent
        e = self._canonical_exponent(min(lo, self.min), max(hi, self.max), start)
        k = self._index(vals, e).astype(np.int64)
        klo = int(k.min())
        counts = np.bincount(k - klo).astype(np.int64)
        self._absorb(klo, counts, e, lo, hi)
        self.count += int(vals.size)
        return self

    def _update_float32(self, x: np.ndarray) -> bool:
        """Fast, bit-identical path of :meth:`update` for all-finite float32 data; False if not taken.

        Calibration streams float32 activations, and widening them to float64
        dominated the cost. Scaling a float32 by a power of two is exact unless
        it underflows, and an underflowed value has magnitude below one, so its
        floor is still 0 (or -1 for a negative value, restored by the same fix
        as :meth:`_index`): the bin indices equal the float64 ones. Data with a
        NaN or an infinity takes the general path.
        """
        flat = x.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return False
        lo, hi = lo + 0.0, hi + 0.0
        start = self.min_exponent if self.count == 0 else self.exponent
        e = self._canonical_exponent(min(lo, self.min), max(hi, self.max), start)
        klo, khi = (int(v) for v in self._index(np.array([lo, hi]), e))
        if -126 <= -e <= 127:
            k = np.multiply(flat, np.float32(math.ldexp(1.0, -e)))
        else:
            k = np.ldexp(flat, np.int32(-e)).astype(np.float32, copy=False)
        np.floor(k, out=k)
        if e > 0:
            k[(k == 0) & (flat < 0)] = -1.0
        # k - klo lies in [0, khi - klo]: exact in float32 (small integers, or Sterbenz for close large ones)
        np.subtract(k, np.float32(klo), out=k)
        counts = np.bincount(k.astype(np.intp), minlength=khi - klo + 1).astype(np.int64, copy=False)
        self._absorb(klo, counts, e, lo, hi)
        self.count += int(flat.size)
        return True

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        """Fold another histogram into this one exactly; returns ``self``."""
        if (other.max_bins, other.min_exponent) != (self.max_bins, self.min_exponent):
            raise ValueError("cannot merge histograms with different max_bins or min_exponent")
        self.nonfinite += other.nonfinite
        if other.count == 0:
            return self
        self._absorb(other.offset, other.counts.copy(), other.exponent, other.min, other.max)
        self.count += other.count
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable state (min/max are None when empty)."""
        return {
            "kind": "histogram",
            "max_bins": self.max_bins,
            "min_exponent": self.min_exponent,
            "exponent": self.exponent,
            "offset": self.offset,
            "counts": self.counts.tolist(),
            "count": self.count,
            "nonfinite": self.nonfinite,
            "min": _none_if_inf(self.min),
            "max": _none_if_inf(self.max),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistogramObserver:
        """Rebuild a histogram from :meth:`to_dict` output."""
        obs = cls(max_bins=d["max_bins"], min_exponent=d["min_exponent"])
        obs.exponent = int(d["exponent"])
        obs.offset = int(d["offset"])
        obs.counts = np.asarray(d["counts"], dtype=np.int64).reshape(-1)
        obs.count = int(d["count"])
        obs.nonfinite = int(d["nonfinite"])
        obs.min = math.inf if d["min"] is None else float(d["min"])
        obs.max = -math.inf if d["max"] is None else float(d["max"])
        return obs

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistogramObserver):
            return NotImplemented
        return (
            self.max_bins == other.max_bins
            and self.min_exponent == other.min_exponent
            and self.exponent == other.exponent
            and self.offset == other.offset
            and self.count == other.count
            and self.nonfinite == other.nonfinite
            and self.min == other.min
            and self.max == other.max
            and np.array_equal(self.counts, other.counts)
        )

    def __repr__(self) -> str:
        return (
            f"HistogramObserver(count={self.count}, min={self.min}, max={self.max}, "
            f"bins={self.counts.size}, width=2**{self.exponent})"
        )
