"""Float16 numerics: the format's limits, what rounding a tensor to it costs, and a streamed error statistic.

IEEE half precision keeps 11 significant bits and a finite range of +-65504;
values below 2**-24 in magnitude flush to zero. These functions judge, from
numbers alone, whether a tensor survives the trip to float16: its largest
magnitude against the range (with a headroom factor, since calibration data
rarely shows the worst case) and the signal-to-noise ratio of the rounding.
`ErrorEnergyObserver` streams the energy of a reference tensor and of an error
tensor sample by sample and merges like the calibration observers, so the fp16
pass can measure a candidate model's error on the same data loop.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["FP16_MAX", "fits_fp16", "cast_sqnr_db", "sqnr_db", "ErrorEnergyObserver"]

FP16_MAX = float(np.finfo(np.float16).max)
"""The largest finite float16 value (65504)."""


def fits_fp16(absmax: float, headroom: float) -> bool:
    """Whether values up to `absmax` stay finite in float16 with a factor `headroom` to spare."""
    return math.isfinite(absmax) and absmax * headroom <= FP16_MAX


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-noise ratio in dB; +inf for no noise, -inf for noise on a zero signal."""
    if noise_energy <= 0.0:
        return math.inf
    if signal_energy <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def cast_sqnr_db(x: np.ndarray) -> float:
    """SQNR (dB) of rounding `x` to float16: +inf when exact, -inf when a finite value overflows."""
    a = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16).astype(np.float64)
    if not np.isfinite(h[np.isfinite(a)]).all():
        return -math.inf
    finite = np.isfinite(a)
    return sqnr_db(float(np.sum(a[finite] ** 2)), float(np.sum((a[finite] - h[finite]) ** 2)))


class ErrorEnergyObserver:
    """Streamed energy of one tensor: count, sum of squares of its finite values, non-finite count.

    Fed the reference activation it gives the signal energy; fed the difference
    between a candidate's activation and the reference it gives the noise
    energy. Two observers of disjoint samples merge into one of all of them
    (sums add; float rounding of the sum aside, the order does not matter).
    """

    def __init__(self) -> None:
        self.count = 0
        self.energy = 0.0
        self.nonfinite = 0

    def update(self, x: np.ndarray) -> ErrorEnergyObserver:
        """Fold one sample's tensor into the sums; returns `self`."""
        a = np.asarray(x, dtype=np.float64).ravel()
        finite = np.isfinite(a)
        self.nonfinite += int(a.size - np.count_nonzero(finite))
        self.count += int(np.count_nonzero(finite))
        self.energy += float(np.dot(a[finite], a[finite]))
        return self

    def merge(self, other: ErrorEnergyObserver) -> ErrorEnergyObserver:
        """Add the sums of `other` (observed on other samples); returns `self`."""
        self.count += other.count
        self.energy += other.energy
        self.nonfinite += other.nonfinite
        return self

    def to_dict(self) -> dict[str, Any]:
        """The state as plain JSON values."""
        return {"count": self.count, "energy": self.energy, "nonfinite": self.nonfinite}
