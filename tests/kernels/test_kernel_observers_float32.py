"""The float32 fast path of HistogramObserver.update matches the general float64 path bit for bit."""

import numpy as np
import pytest

from onnxopt.kernels.observers import HistogramObserver


def _batches(kind: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(6):
        n = int(rng.integers(1, 3000))
        if kind == 0:
            x = rng.standard_normal(n) * 10 ** rng.uniform(-30, 30)
        elif kind == 1:
            x = 1000 + rng.standard_normal(n) * 1e-3  # far from zero: large bin indices
        elif kind == 2:
            x = np.maximum(rng.standard_normal((n, 2)), 0)  # ReLU, 2-D
        elif kind == 3:
            x = rng.standard_normal(n) * 1e30
            x[:3] = [-1e-45, 1e-40, -0.0]  # values that underflow when scaled
        else:
            x = -5e6 + rng.standard_normal(n)
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("max_bins", [2, 8, 2048])
@pytest.mark.parametrize("kind", range(5))
def test_float32_path_equals_float64_path(kind: int, max_bins: int) -> None:
    rng = np.random.default_rng(kind)
    fast, general = HistogramObserver(max_bins=max_bins), HistogramObserver(max_bins=max_bins)
    for x in _batches(kind, rng):
        fast.update(x)
        general.update(x.astype(np.float64))
        assert fast == general


def test_float32_with_nonfinite_takes_general_path() -> None:
    x = np.array([1.0, np.nan, -2.0, np.inf], dtype=np.float32)
    h = HistogramObserver().update(x)
    assert (h.count, h.nonfinite, h.min, h.max) == (2, 2, -2.0, 1.0)
