"""One tolerance table for `--check` and `validate`, and how an output is judged against it."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.verify.comparison import OutputCheck, judge, output_metrics
from onnxopt.verify.tolerance import Tolerance, loosest


def _judged(ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> list[str]:
    m = output_metrics("y", ref, cand, topk=1, scores=set())
    oc = OutputCheck("pass", "y")
    oc.max_abs, oc.cosine, oc.sqnr_db, oc.nonfinite = m.max_abs, m.cosine, m.sqnr_db, m.nonfinite
    return judge(oc, tol.pass_, m.scale)


def test_an_integer_output_off_by_one_fails_the_exact_class_however_large_it_is():
    ref = np.array([20000, 3, 7], dtype=np.int64)
    assert _judged(ref, ref.copy(), Tolerance.EXACT) == []
    assert _judged(ref, ref + np.array([1, 0, 0]), Tolerance.EXACT)


def test_a_float_output_within_rounding_of_its_magnitude_passes_the_exact_class():
    ref = np.array([20000.0, 3.0, 7.0], dtype=np.float32)
    cand = ref + np.array([1e-3, 0, 0], dtype=np.float32)
    assert _judged(ref, cand, Tolerance.EXACT) == []
    assert _judged(ref, ref + np.array([10.0, 0, 0], dtype=np.float32), Tolerance.EXACT)


@pytest.mark.parametrize("sqnr_db,passes", [(25.0, True), (12.0, False)])
def test_quantize_class_judges_by_20_db(sqnr_db, passes):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(4096).astype(np.float32)
    noise = rng.standard_normal(4096).astype(np.float32)
    noise *= np.sqrt(np.mean(ref**2) / np.mean(noise**2) / 10 ** (sqnr_db / 10))
    assert (_judged(ref, ref + noise, Tolerance.QUANTIZE) == []) is passes


def test_a_pipeline_takes_its_loosest_class():
    assert loosest(["exact", "quantize", "approximate"]) == "quantize"
    assert loosest([]) == "exact"
