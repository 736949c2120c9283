"""Streamed second moments of tensors read as rows of a matrix product (their last axis).

For a layer y = x W, E[x^T x] over every row of x (batch, tokens) is the matrix that
turns a weight error dW into the output error it causes: E||x dW||^2 = tr(dW^T E[x^T x] dW).
Weight-only quantization (GPTQ's Hessian, AWQ's channel magnitudes from its diagonal)
and whitened factorization read it. Built sample by sample through `observe` in
bounded memory, and mergeable like every statistic of the data layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized

import numpy as np
import onnx

from onnxopt.data.observe import observe
from onnxopt.data.samples import Sample
from onnxopt.kernels.lowrank import CovarianceAccumulator


class RowMoments:
    """Streamed E[x^T x] and E[x] of a tensor's rows (last axis of width `dim`), and its largest shape."""

    def __init__(self, dim: int):
        self.acc = CovarianceAccumulator(dim)
        self.shape: tuple[int, ...] = ()

    def update(self, x: np.ndarray) -> None:
        """Add one sample of the tensor."""
        x = np.asarray(x)
        if x.size > int(np.prod(self.shape or (0,))):
            self.shape = tuple(int(d) for d in x.shape)
        self.acc.update(x)

    def merge(self, other: RowMoments) -> RowMoments:
        """Add the sums of another pass over more samples; keeps the larger shape."""
        self.acc.merge(other.acc)
        if int(np.prod(other.shape or (0,))) > int(np.prod(self.shape or (0,))):
            self.shape = other.shape
        return self

    def finite(self) -> bool:
        """True when no inf/NaN reached the sums."""
        return self.acc.finite()

    def second_moment(self) -> np.ndarray:
        """E[x^T x] (dim x dim)."""
        return self.acc.second_moment()


def row_moments(
    model: onnx.ModelProto, samples: Iterable[Sample], dims: dict[str, int], desc: str = "input moments"
) -> dict[str, RowMoments]:
    """Stream `samples` through `model` and return the `RowMoments` of each tensor of `dims` ({name: width})."""
    total = len(samples) if isinstance(samples, Sized) else None
    return observe(model, samples, sorted(dims), lambda name: RowMoments(dims[name]), desc=desc, total=total)
