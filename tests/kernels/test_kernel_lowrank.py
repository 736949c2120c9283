"""Low-rank numerics: SVD error behaviour, whitened SVD predictions, rank helpers, covariance merging."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.kernels.lowrank import (
    CovarianceAccumulator,
    energy_rank,
    error_curve,
    max_useful_rank,
    predicted_error,
    rank_for_param_budget,
    round_rank,
    truncated_svd,
    whitened_svd,
)


def _weight(m=24, n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, n)) * np.exp(-np.arange(n) / 4.0)).astype(np.float32)


def _calibration(m=24, rows=4000, seed=1):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((m, m)) * np.exp(-np.arange(m) / 3.0)
    return rng.standard_normal((rows, m)) @ mix + 0.5


def test_svd_error_falls_with_rank_and_matches_prediction():
    W = _weight()
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    errors = []
    for r in range(1, 17):
        A, B = truncated_svd(W, r)
        assert A.shape == (24, r) and B.shape == (r, 16) and A.dtype == np.float32
        rel = np.linalg.norm(W - A @ B) / np.linalg.norm(W)
        errors.append(rel)
        assert rel == pytest.approx(predicted_error(s, r), rel=1e-3, abs=1e-5)
    assert all(b < a for a, b in zip(errors, errors[1:-1]))


def test_full_rank_reproduces_w():
    W = _weight()
    A, B = truncated_svd(W, 16)
    np.testing.assert_allclose(A @ B, W, rtol=1e-5, atol=1e-5 * np.abs(W).max())
    A, B = truncated_svd(W, 100)
    assert A.shape == (24, 16)
    with pytest.raises(ValueError):
        truncated_svd(W, 0)


def test_whitened_svd_prediction_matches_measured_error_on_calibration_data():
    W = _weight().astype(np.float64)
    X = _calibration()
    acc = CovarianceAccumulator(24).update(X)
    Y = X @ W
    for r in (2, 5, 9):
        A, B, pred = whitened_svd(W, acc.second_moment(), r, eps=1e-10)
        measured = np.linalg.norm(Y - X @ A @ B) / np.linalg.norm(Y)
        assert measured == pytest.approx(pred, rel=1e-4)
        plain_A, plain_B = truncated_svd(W, r)
        plain = np.linalg.norm(Y - X @ plain_A @ plain_B) / np.linalg.norm(Y)
        assert measured < plain


def test_whitened_svd_survives_rank_deficient_covariance():
    W = _weight()
    X = _calibration(rows=5)
    A, B, pred = whitened_svd(W, CovarianceAccumulator(24).update(X).second_moment(), 4)
    assert np.all(np.isfinite(A)) and np.all(np.isfinite(B)) and 0.0 <= pred <= 1.0
    A, B, pred = whitened_svd(W, np.zeros((24, 24)), 4)
    assert np.all(np.isfinite(A @ B))


def test_error_curve_and_energy_rank():
    s = np.array([3.0, 2.0, 1.0])
    curve = error_curve(s)
    np.testing.assert_allclose(curve, np.sqrt([1.0, 5 / 14, 1 / 14, 0.0]))
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(np.zeros(4)) == 1
    assert np.all(error_curve(np.zeros(3)) == 0)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 3000), n=st.integers(1, 3000), ratio=st.floats(0.01, 1.0))
def test_rank_helpers_respect_their_budgets(m, n, ratio):
    r = max_useful_rank(m, n)
    assert r * (m + n) < m * n <= (r + 1) * (m + n)
    b = rank_for_param_budget(m, n, ratio)
    assert b * (m + n) <= ratio * m * n + 1e-9 and b <= min(m, n)
    assert b == min(m, n) or (b + 1) * (m + n) > ratio * m * n


def test_round_rank():
    assert round_rank(13, 8) == 16
    assert round_rank(16, 8) == 16
    assert round_rank(13, 8, limit=14) == 8
    assert round_rank(3, 8, limit=5) == 5
    assert round_rank(0, 8) == 0


def test_covariance_merge_equals_single_pass():
    rng = np.random.default_rng(4)
    chunks = [rng.standard_normal((int(rng.integers(1, 50)), 3, 6)) + 2.0 for _ in range(6)]
    single = CovarianceAccumulator(6)
    for c in chunks:
        single.update(c)
    left, right = CovarianceAccumulator(6), CovarianceAccumulator(6)
    for i, c in enumerate(chunks[::-1]):
        (left if i % 2 else right).update(c)
    merged = right.merge(left)
    assert merged.count == single.count
    np.testing.assert_allclose(merged.sum_xtx, single.sum_xtx, rtol=1e-12)
    np.testing.assert_allclose(merged.sum_x, single.sum_x, rtol=1e-12)
    rows = np.concatenate([c.reshape(-1, 6) for c in chunks])
    np.testing.assert_allclose(single.second_moment(), rows.T @ rows / len(rows), rtol=1e-10)
    np.testing.assert_allclose(single.covariance(), np.cov(rows, rowvar=False, bias=True), rtol=1e-8, atol=1e-10)
    back = CovarianceAccumulator.from_dict(single.to_dict())
    np.testing.assert_array_equal(back.sum_xtx, single.sum_xtx)
    with pytest.raises(ValueError):
        single.update(np.zeros((2, 5)))
