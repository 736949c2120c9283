"""The final gate over the model zoo (issue #14): `onnxopt optimize -p fold,fuse` through the CLI on every
zoo model writes a valid model (onnx.checker full, the whole signature equal, loads in onnxruntime, outputs
equal to the original's on real inputs from fixtures/zoo_data.py), or leaves it unchanged and says why;
and one task metric through a data-driven pipeline. Checks are written here, apart from onnxopt's own
gate, so they do not trust the code they check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import zoo_data as z
from onnxopt.cli import main
from onnxopt.data.wheel_models import ZOO

FEEDS = {"layout_cdla": 1}  # real feeds compared per model (default 2); layout pages cost ~1 s each


def zoo_model(name: str) -> Path:
    path = z.fixture_path(name)
    if not path.exists():
        pytest.skip(f"{path} missing: run `python fixtures/fetch_models.py`")
    return path


def assert_outputs_equal(ref: Path, cand: Path, feeds: list[dict]) -> None:
    """Every output equal to float rounding (rtol 1e-4, atol 1e-5 + 1e-4 max|ref|); integer outputs exact."""
    r, c = z.ort_runner(ref), z.ort_runner(cand)
    for feed in feeds:
        for i, (a, b) in enumerate(zip(r(feed), c(feed))):
            assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
            if a.dtype.kind in "fc":
                tol = 1e-5 + 1e-4 * float(np.max(np.abs(a), initial=0))
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=tol, err_msg=f"output {i}")
            else:
                np.testing.assert_array_equal(b, a, err_msg=f"output {i}")


@pytest.mark.parametrize("name", ZOO)
def test_fold_fuse_gate(name, tmp_path):
    src = zoo_model(name)
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    rc = main(["optimize", str(src), "-o", str(out), "-p", "fold,fuse", "--report", str(rep), "--quiet"])
    assert rc == 0
    original, cand = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(cand, full_check=True)
    assert z.signature_diff(original, cand) == []
    passes = json.loads(rep.read_text())["passes"]
    if not any(p["changed"] for p in passes):  # left unchanged: every pass says why
        assert all(p.get("reason") for p in passes), passes
    assert len(cand.graph.node) <= len(original.graph.node)
    assert out.stat().st_size <= src.stat().st_size * 1.01  # fold,fuse never grows a file
    feeds = z.TASKS[name].feeds(FEEDS.get(name, 2), z.EVAL_SEED, z.MODELS)[: FEEDS.get(name, 2)]
    assert_outputs_equal(src, out, feeds)


def test_quantize_keeps_the_task_metric(tmp_path):
    """fold,quantize on the romanizer's encoder, calibrated on real names, keeps the greedy transliteration
    of held-out names (exact match with the float pair), and the result is still a valid model."""
    src = zoo_model("romanizer_encoder")
    task = z.TASKS["romanizer_encoder"]
    z.write_feeds(task.feeds(32, z.CALIB_SEED, z.MODELS), tmp_path / "calib")
    out = tmp_path / "q.onnx"
    rc = main(
        ["optimize", str(src), "-o", str(out), "-p", "fold,quantize", "--calib", str(tmp_path / "calib"), "--quiet"]
    )
    assert rc == 0
    cand = onnx.load(str(out))
    onnx.checker.check_model(cand, full_check=True)
    assert z.signature_diff(onnx.load(str(src)), cand) == []
    metric = task.metric(src, out, 64, z.EVAL_SEED, z.MODELS)
    assert metric["names"] == 64 and metric["exact_match"] >= 0.9, metric
