"""Ranges: sane clipping on Gaussian/Laplacian data, zero always inside, no NaN on degenerate input."""

import math

import numpy as np
import pytest

from onnxopt.kernels.observers import HistogramObserver, MinMaxObserver
from onnxopt.kernels.ranges import range_entropy, range_minmax, range_mse, range_percentile

METHODS = [
    lambda h: range_minmax(h),
    lambda h: range_percentile(h),
    lambda h: range_percentile(h, symmetric=True),
    lambda h: range_entropy(h),
    lambda h: range_entropy(h, symmetric=False),
    lambda h: range_mse(h),
    lambda h: range_mse(h, symmetric=False),
]


@pytest.fixture(scope="module")
def laplace_hist():
    return HistogramObserver().update(np.random.default_rng(0).laplace(size=200_000))


@pytest.fixture(scope="module")
def gauss_hist():
    return HistogramObserver().update(np.random.default_rng(1).standard_normal(200_000))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "data",
    [
        np.array([]),
        np.zeros(100),
        np.full(50, 5.0),
        np.full(50, -2.0),
        np.array([np.nan, 1e-30]),
        np.abs(np.random.default_rng(2).standard_normal(1000)) + 10.0,
    ],
    ids=["empty", "zeros", "single_positive", "single_negative", "nan_and_tiny", "far_from_zero"],
)
def test_ranges_are_finite_and_contain_zero(method, data):
    lo, hi = method(HistogramObserver().update(data))
    assert isinstance(lo, float) and isinstance(hi, float)
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo <= 0.0 <= hi
    finite = data[np.isfinite(data)]
    if finite.size:
        assert -np.abs(finite).max() <= lo and hi <= np.abs(finite).max()


def test_degenerate_ranges_are_exact():
    assert range_minmax(HistogramObserver()) == (0.0, 0.0)
    assert range_entropy(HistogramObserver().update(np.zeros(10))) == (0.0, 0.0)
    h = HistogramObserver().update(np.full(50, 5.0))
    assert range_minmax(h) == (0.0, 5.0)
    assert range_percentile(h) == (0.0, 5.0)
    assert range_entropy(h) == (-5.0, 5.0)
    assert 0.0 < range_mse(h)[1] <= 5.0


def test_minmax_observer_ranges_per_channel():
    obs = MinMaxObserver(axis=0).update(np.array([[1.0, 2.0], [-3.0, -1.0], [0.5, 4.0]]))
    lo, hi = range_minmax(obs)
    np.testing.assert_array_equal(lo, [0.0, -3.0, 0.0])
    np.testing.assert_array_equal(hi, [2.0, 0.0, 4.0])
    assert range_minmax(MinMaxObserver().update(np.array([2.0, 3.0]))) == (0.0, 3.0)
    assert range_minmax(MinMaxObserver()) == (0.0, 0.0)


def test_percentile_matches_numpy(gauss_hist, laplace_hist):
    for h, seed, draw in ((gauss_hist, 1, "standard_normal"), (laplace_hist, 0, "laplace")):
        x = getattr(np.random.default_rng(seed), draw)(size=200_000)
        lo, hi = range_percentile(h, 99.9)
        assert lo == pytest.approx(np.percentile(x, 0.1), abs=2 * h.bin_width)
        assert hi == pytest.approx(np.percentile(x, 99.9), abs=2 * h.bin_width)
        t = range_percentile(h, 99.0, symmetric=True)[1]
        assert t == pytest.approx(np.percentile(np.abs(x), 99.0), abs=2 * h.bin_width)


def test_heavy_tails_are_clipped(laplace_hist):
    amax = laplace_hist.absmax
    for lo, hi in (range_entropy(laplace_hist), range_mse(laplace_hist), range_percentile(laplace_hist, 99.9)):
        assert hi < 0.9 * amax
        assert lo < 0 < hi
        assert hi > 3.0


def test_gaussian_clips_are_sensible(gauss_hist):
    amax = gauss_hist.absmax
    lo, hi = range_mse(gauss_hist, bits=8)
    assert 2.5 < hi <= amax and lo == -hi
    lo4, hi4 = range_mse(gauss_hist, bits=4)
    assert 1.5 < hi4 < hi
    lo, hi = range_entropy(gauss_hist)
    assert 2.5 < hi <= amax
    lo, hi = range_percentile(gauss_hist, 99.99)
    assert 3.0 < hi <= amax and -amax <= lo < -3.0


def test_entropy_prefers_fewer_bins_for_coarser_quantization(laplace_hist):
    t128 = range_entropy(laplace_hist, num_quant_bins=128)[1]
    t16 = range_entropy(laplace_hist, num_quant_bins=16)[1]
    assert t16 < t128


def test_nonnegative_data_gives_zero_lower_bound():
    relu = np.maximum(np.random.default_rng(3).laplace(size=50_000), 0.0)
    h = HistogramObserver().update(relu)
    for lo, hi in (range_percentile(h), range_entropy(h, symmetric=False), range_mse(h, symmetric=False)):
        assert lo == 0.0 and 0.0 < hi <= relu.max()
    lo, hi = range_entropy(h, symmetric=True)
    assert lo == -hi


def test_percentile_validates_argument(gauss_hist):
    with pytest.raises(ValueError):
        range_percentile(gauss_hist, 0.0)


def test_percentile_interpolates_inside_coarse_bins():
    x = np.arange(80_000) / 10_000.0
    h = HistogramObserver(max_bins=8).update(x)
    assert h.bin_width == 1.0
    lo, hi = range_percentile(h, 55.0)
    assert hi == pytest.approx(np.percentile(x, 55.0), abs=1e-3)
    assert lo == 0.0
    assert range_percentile(h, 70.0, symmetric=True)[1] == pytest.approx(5.6, abs=1e-3)
