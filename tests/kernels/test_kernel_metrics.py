"""Output comparison metrics, including their edge cases and JSON form."""

import json
import math

import numpy as np
import pytest

from onnxopt.kernels.metrics import (
    compare,
    cosine,
    max_abs_error,
    mean_abs_error,
    nan_inf_count,
    sqnr_db,
    topk_agreement,
)


def test_identical_outputs():
    x = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    assert max_abs_error(x, x) == 0.0 and mean_abs_error(x, x) == 0.0
    assert cosine(x, x) == pytest.approx(1.0)
    assert sqnr_db(x, x) == math.inf
    report = compare(x, x)
    assert report["sqnr_db"] == "inf" and report["top1_agreement"] == 1.0
    json.dumps(report, allow_nan=False)


def test_known_values():
    ref, cand = np.array([1.0, 1.0]), np.array([1.1, 0.9])
    assert sqnr_db(ref, cand) == pytest.approx(20.0)
    assert max_abs_error(ref, cand) == pytest.approx(0.1)
    assert mean_abs_error(ref, cand) == pytest.approx(0.1)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine([1.0, 2.0], [-2.0, -4.0]) == pytest.approx(-1.0)
    assert cosine([1e200, 1e200], [1e200, 1e200]) == pytest.approx(1.0)


def test_zero_edge_cases():
    z = np.zeros(5)
    assert cosine(z, z) == 1.0
    assert cosine(z, np.ones(5)) == 0.0
    assert sqnr_db(z, z) == math.inf
    assert sqnr_db(z, np.ones(5)) == -math.inf
    assert compare(z, np.ones(5))["sqnr_db"] == "-inf"
    empty = np.zeros((0, 3))
    assert max_abs_error(empty, empty) == 0.0 and topk_agreement(empty, empty) == 1.0


def test_topk_agreement():
    ref = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    cand = np.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    assert topk_agreement(ref, cand, 1) == 0.5
    assert topk_agreement(ref, cand, 2) == 0.5
    assert topk_agreement(ref, cand, 3) == 1.0
    assert topk_agreement(ref, cand, 10) == 1.0
    assert topk_agreement(ref.T, cand.T, 1, axis=0) == 0.5
    with pytest.raises(ValueError):
        topk_agreement(np.float32(1.0), np.float32(1.0))


def test_nan_inf_reporting():
    ref = np.array([1.0, 2.0, 3.0])
    cand = np.array([1.0, np.nan, np.inf])
    assert nan_inf_count(cand) == {"nan": 1, "inf": 1}
    assert nan_inf_count(np.arange(3)) == {"nan": 0, "inf": 0}
    report = compare(ref, cand)
    assert report["cand_nan"] == 1 and report["cand_inf"] == 1 and report["ref_nan"] == 0
    assert report["max_abs_error"] is None
    json.dumps(report, allow_nan=False)


def test_compare_scalar_and_shape_mismatch():
    report = compare(np.float32(2.0), np.float32(2.5))
    assert report["top1_agreement"] is None and report["max_abs_error"] == 0.5
    with pytest.raises(ValueError):
        compare(np.zeros(3), np.zeros(4))
