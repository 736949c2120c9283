"""Observers: streamed statistics merge bit-exactly whatever the sharding and order."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.kernels.observers import HistogramObserver, MinMaxObserver


def _data(seed: int, n: int, scale_exp: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 2.0**scale_exp
    x[rng.random(n) < 0.1] = 0.0
    x[rng.random(n) < 0.02] *= 1e3
    if n > 3:
        x[rng.integers(0, n)] = -0.0
    return x


def _shards(rng: np.random.Generator, x: np.ndarray, n_shards: int) -> list[np.ndarray]:
    cuts = np.sort(rng.integers(0, x.size + 1, size=n_shards - 1))
    parts = np.split(x, cuts)
    shaped = []
    for p in parts:
        if p.size % 2 == 0 and p.size:
            p = p.reshape(2, -1)
        shaped.append(p)
    return shaped


def _tree_merge(observers: list, rng: np.random.Generator):
    pool = list(observers)
    while len(pool) > 1:
        i, j = rng.choice(len(pool), size=2, replace=False)
        merged = pool[i].merge(pool[j])
        pool = [o for t, o in enumerate(pool) if t not in (i, j)] + [merged]
    return pool[0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 3000),
    n_shards=st.integers(1, 7),
    max_bins=st.sampled_from([2, 3, 7, 64, 4096]),
    scale_exp=st.integers(-40, 40),
)
def test_histogram_sharded_merge_is_bit_exact(seed, n, n_shards, max_bins, scale_exp):
    x = _data(seed, n, scale_exp)
    rng = np.random.default_rng(seed + 1)
    single = HistogramObserver(max_bins=max_bins).update(x)

    shards = _shards(rng, x, n_shards)
    merged = _tree_merge([HistogramObserver(max_bins=max_bins).update(s) for s in shards], rng)
    assert merged == single

    sequential = HistogramObserver(max_bins=max_bins)
    for idx in rng.permutation(len(shards)):
        sequential.update(shards[idx])
    assert sequential == single
    assert single.counts.size <= max_bins
    assert single.counts.sum() == single.count == n


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=40),
    split=st.integers(0, 40),
    max_bins=st.sampled_from([2, 5, 4096]),
)
def test_histogram_extreme_floats_merge_exactly(values, split, max_bins):
    x = np.array(values, dtype=np.float64)
    a = HistogramObserver(max_bins=max_bins).update(x[:split])
    b = HistogramObserver(max_bins=max_bins).update(x[split:])
    single = HistogramObserver(max_bins=max_bins).update(x)
    assert b.merge(a) == single
    finite = x[np.isfinite(x)]
    assert single.count == finite.size
    assert single.nonfinite == x.size - finite.size
    if finite.size:
        assert single.min == finite.min() and single.max == finite.max()
        edges = single.bin_edges()
        assert edges[0] <= single.min and single.max < edges[-1] or single.max == edges[-1] == 0


def test_histogram_bins_hold_their_values():
    rng = np.random.default_rng(0)
    x = rng.laplace(size=20000) * 3.0 + 1.0
    h = HistogramObserver(max_bins=512).update(x)
    k = np.floor(x / h.bin_width).astype(np.int64)
    expected = np.bincount(k - k.min())
    assert h.offset == k.min()
    np.testing.assert_array_equal(h.counts, expected)
    assert h.absmax == np.abs(x).max()


def test_histogram_memory_is_bounded():
    rng = np.random.default_rng(1)
    h = HistogramObserver(max_bins=256)
    for i in range(20):
        h.update(rng.standard_normal(5000) * 10.0**i)
    assert h.counts.size <= 256
    assert h.count == 100000


def test_histogram_dict_round_trip_through_json():
    h = HistogramObserver(max_bins=32).update(np.array([1.5, -2.0, np.nan, 7.0]))
    back = HistogramObserver.from_dict(json.loads(json.dumps(h.to_dict())))
    assert back == h
    empty = HistogramObserver()
    assert HistogramObserver.from_dict(json.loads(json.dumps(empty.to_dict()))) == empty


def test_histogram_merge_rejects_other_grid():
    with pytest.raises(ValueError):
        HistogramObserver(max_bins=8).merge(HistogramObserver(max_bins=16))


def test_histogram_state_depends_on_data():
    a = HistogramObserver().update(np.array([1.0, 2.0]))
    b = HistogramObserver().update(np.array([1.0, 2.5]))
    assert a != b


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_shards=st.integers(1, 5), axis=st.sampled_from([None, 0, 1, -1]))
def test_minmax_sharded_merge_equals_single_pass(seed, n_shards, axis):
    rng = np.random.default_rng(seed)

    def batch_shape():
        shape = [int(rng.integers(1, 5)), int(rng.integers(1, 5))]
        shape.insert(1 if axis is None else axis % 3, 3)
        return shape

    batches = [rng.standard_normal(batch_shape()) for _ in range(n_shards)]
    batches[0].flat[0] = np.nan
    single = MinMaxObserver(axis=axis)
    for b in batches:
        single.update(b)
    parts = [MinMaxObserver(axis=axis).update(b) for b in batches]
    merged = _tree_merge(parts, rng)
    assert merged == single
    stacked = np.concatenate(
        [
            np.moveaxis(b, axis if axis is not None else 0, 0).reshape(b.shape[axis] if axis is not None else 1, -1)
            for b in batches
        ],
        axis=1,
    )
    expected_min = np.where(np.isnan(stacked), np.inf, stacked).min(axis=1)
    if axis is None:
        expected_min = expected_min[0]
    np.testing.assert_array_equal(single.min, expected_min)
    assert single.nonfinite == 1


def test_minmax_per_channel_dict_round_trip_and_errors():
    obs = MinMaxObserver(axis=1).update(np.array([[1.0, np.inf], [-3.0, np.nan]]))
    d = json.loads(json.dumps(obs.to_dict()))
    assert d["max"] == [1.0, None]
    assert MinMaxObserver.from_dict(d) == obs
    with pytest.raises(ValueError):
        obs.update(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        obs.merge(MinMaxObserver(axis=0))


def test_minmax_negative_zero_is_canonical():
    a = MinMaxObserver().update(np.array([-0.0, 0.0]))
    b = MinMaxObserver().update(np.array([0.0, -0.0]))
    assert a == b
    assert not np.signbit(a.min) and not np.signbit(b.max)


def test_histogram_tiny_negative_value_lands_below_zero():
    h = HistogramObserver(max_bins=4).update(np.array([-5e-324, 1000.0]))
    assert h.exponent > 0
    assert h.offset == -1
    assert h.bin_edges()[0] <= h.min < 0.0


def test_histogram_signed_zero_merges_to_identical_bytes():
    def merged(first, second):
        a = HistogramObserver().update(np.array([first]))
        return json.dumps(a.merge(HistogramObserver().update(np.array([second]))).to_dict())

    assert merged(-0.0, 0.0) == merged(0.0, -0.0)
    assert not np.signbit(HistogramObserver().update(np.array([-0.0])).min)
