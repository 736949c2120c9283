"""Bias correction: cancel the mean output shift that weight rounding causes.

Rounding a weight W to W_q shifts every output by (W_q - W) x; on average by
(W_q - W) E[x]. Inputs with a large mean (after ReLU, hard-swish...) turn that
into a bias error, which a following normalization amplifies by |mean|/std of
the output channel. Subtracting the expected shift from the bias (Nagel et
al., "Data-Free Quantization", 2019, with E[x] from calibration) removes it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ChannelMeanObserver", "mean_output_shift"]


class ChannelMeanObserver:
    """Streamed per-channel mean of a tensor along `axis` (exactly mergeable sums in float64).

    Shapes may vary between updates except along `axis`.
    """

    def __init__(self, axis: int = 1) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> ChannelMeanObserver:
        x = np.asarray(x, dtype=np.float64)
        axis = self.axis % x.ndim
        s = x.sum(axis=tuple(a for a in range(x.ndim) if a != axis))
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.size // x.shape[axis]
        return self

    def merge(self, other: ChannelMeanObserver) -> ChannelMeanObserver:
        if other.sum is not None:
            self.sum = other.sum.copy() if self.sum is None else self.sum + other.sum
            self.count += other.count
        return self

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sum is None or self.count == 0 else self.sum / self.count

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "count": self.count, "sum": None if self.sum is None else self.sum.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelMeanObserver:
        obs = cls(d["axis"])
        obs.count = int(d["count"])
        obs.sum = None if d["sum"] is None else np.asarray(d["sum"], dtype=np.float64)
        return obs


def mean_output_shift(
    weight: np.ndarray, weight_dq: np.ndarray, mean_x: np.ndarray, kind: str, group: int = 1
) -> np.ndarray:
    """Expected output shift (W_q - W) E[x] per output channel, float64.

    kind: "conv" (weight [O, I/group, *k], mean over input channels [I]),
    "matmul" (weight [K, N], mean [K]) or "gemm_t" (weight [N, K], mean [K]).
    """
    err = np.asarray(weight_dq, np.float64) - np.asarray(weight, np.float64)
    m = np.asarray(mean_x, np.float64)
    if kind == "matmul":
        return m @ err
    if kind == "gemm_t":
        return err @ m
    out = err.shape[0]
    err = err.reshape(out, err.shape[1], -1).sum(axis=2)
    per_group = m.reshape(group, -1)
    return np.einsum("oi,oi->o", err, per_group[np.arange(out) // (out // group)])
