"""`onnxopt validate`: verdicts, thresholds, skipped and failed EPs, placement and the report."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest

from onnxopt.analysis.shapes import parse_input_shapes
from onnxopt.errors import UserError
from onnxopt.verify.ep import envs
from onnxopt.verify.tolerance import ThresholdSet
from onnxopt.verify.validate import validate
from onnxopt.verify.validate_cli import add_validate_arguments, run_validate_command

ROOT = Path(__file__).resolve().parents[2]
CLS_MODEL = ROOT / ".fixtures" / "models" / "cls.onnx"

CONV = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x) => (float[1,5] prob) <float[4,3,3,3] w = {%s}, float[4,5] fc = {%s}> {
    c = Conv<pads = [1,1,1,1]>(x, w)
    r = Relu(c)
    p = GlobalAveragePool(r)
    f = Flatten(p)
    logits = MatMul(f, fc)
    prob = Softmax(logits)
}
"""
HARDMAX = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4,4] x) => (float[4,4] y) {
    a = Relu(x)
    b = Hardmax(a)
    y = Relu(b)
}
"""


def _save(model: onnx.ModelProto, path: Path) -> Path:
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"n{i}_{node.op_type}"
    onnx.save(model, path)
    return path


@pytest.fixture
def conv_models(tmp_path: Path) -> tuple[Path, Path]:
    """A small classifier and a broken copy whose Conv weight is scaled by 1.5."""
    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.standard_normal(4 * 3 * 9))
    fc = ", ".join(f"{v:.4f}" for v in rng.standard_normal(20))
    model = onnx.parser.parse_model(CONV % (w, fc))
    ref = _save(model, tmp_path / "ref.onnx")
    init = model.graph.initializer[0]
    init.CopyFrom(nh.from_array(nh.to_array(init) * 1.5, init.name))
    return ref, _save(model, tmp_path / "broken.onnx")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return run_validate_command(parser.parse_args([*argv, "--runs", "2", "--warmup", "1", "--samples", "3"]))


def need_openvino() -> None:
    if envs.managed_python("openvino") is None:
        pytest.skip(f"no managed OpenVINO environment at {envs.env_dir('openvino')}; run `onnxopt ep setup openvino`")


def test_identical_model_passes_with_report(conv_models, tmp_path, capsys):
    ref, _ = conv_models
    report_path = tmp_path / "r.json"
    assert cli(str(ref), str(ref), "--report", str(report_path)) == 0
    out = capsys.readouterr().out
    assert "result: PASSED" in out and "placement: CPU: " in out and "CAND/REF" in out
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["eps"][0]["status"] == "passed"
    assert report["pass_checks"][0]["output"] == "prob" and report["pass_checks"][0]["topk"] == 1.0
    assert report["eps"][0]["latency"]["ratio"] > 0


def test_broken_model_exits_1_with_readable_violation(conv_models, capsys):
    ref, broken = conv_models
    assert cli(str(ref), str(broken)) == 1
    out = capsys.readouterr().out
    assert "result: FAILED" in out and "FAIL: max_abs" in out and "cosine" in out


def test_loose_tolerance_accepts_what_exact_rejects(conv_models):
    ref, broken = conv_models
    loose = ThresholdSet.for_tolerance("approximate", min_cosine=0.5, min_sqnr_db=0.0, min_topk=0.0)
    report = validate(ref, broken, samples=2, thresholds=loose, runs=1, warmup=0)
    assert not report.pass_checks[0].violations
    assert validate(ref, broken, samples=2, runs=1, warmup=0).passed is False


def test_calibration_data_is_used(conv_models, tmp_path):
    ref, _ = conv_models
    np.savez(tmp_path / "data.npz", x=np.ones((2, 1, 3, 8, 8), np.float32))
    report = validate(ref, ref, data=tmp_path / "data.npz", samples=2, runs=1)
    assert report.samples == 2 and "from" in report.inputs and not report.warnings


def test_random_inputs_warn(conv_models):
    ref, _ = conv_models
    report = validate(ref, ref, samples=1, runs=1)
    assert any("weak evidence" in w for w in report.warnings)


def test_cuda_is_skipped_with_reason_never_passed(conv_models, monkeypatch):
    monkeypatch.delenv("ONNXOPT_EP_PYTHON_CUDA", raising=False)
    if not envs.gpu_absent_reason():
        pytest.skip("this machine has an NVIDIA GPU; CUDA is validated for real")
    ref, _ = conv_models
    report = validate(ref, ref, eps=("cpu", "cuda"), samples=1, runs=1)
    cuda = report.eps[1]
    assert cuda.status == "skipped" and "no NVIDIA GPU" in cuda.reason
    table = report.format_table()
    assert "cuda [SKIPPED]" in table and "not run here: cuda" in table and "--allow-missing-ep" in table
    assert not report.passed and report.verdict == "inconclusive"
    allowed = validate(ref, ref, eps=("cpu", "cuda"), samples=1, runs=1, allow_missing_ep=True)
    assert allowed.passed and "not run here: cuda (allowed by --allow-missing-ep)" in allowed.format_table()


def test_worker_killed_mid_run_is_a_failed_check(conv_models, tmp_path):
    """An 'OpenVINO interpreter' that claims the provider, then is killed by SIGKILL while running the worker.

    (tests/verify/test_ep_worker.py kills the real worker in its timing loop.)
    """
    ref, _ = conv_models
    fake = tmp_path / "fake-python"
    probe = json.dumps({"version": "fake", "providers": ["OpenVINOExecutionProvider"], "python": "3"})
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ]; then echo '{probe}'; exit 0; fi
echo "worker about to be killed" >&2
sleep 0.2
kill -9 $$
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    report = validate(ref, ref, eps=("openvino",), samples=1, runs=1, ep_python={"openvino": str(fake)})
    ov = report.eps[0]
    assert "killed by signal SIGKILL" in ov.errors[0] and "worker about to be killed" in ov.errors[0]
    # the fake kills REF's worker as well: the original fails here too, so the candidate is not blamed
    assert ov.status == "inconclusive" and "the original fails here too" in ov.reason and not report.passed


def test_unavailable_named_interpreter_is_skipped(conv_models):
    ref, _ = conv_models
    report = validate(ref, ref, eps=("openvino",), samples=1, runs=1, ep_python={"openvino": "/nonexistent/python"})
    assert report.eps[0].status == "skipped" and "/nonexistent/python" in report.eps[0].reason
    assert not report.passed  # the only EP asked for never ran: nothing was judged


def test_user_errors():
    with pytest.raises(UserError):
        parse_input_shapes(["x=1xAx3"])
    with pytest.raises(UserError):
        validate("a.onnx", "b.onnx", eps=("tpu",))
    assert parse_input_shapes(["x=1x3x48x320"]) == {"x": (1, 3, 48, 320)}


def test_openvino_passes_and_reports_placement(conv_models, capsys):
    need_openvino()
    ref, broken = conv_models
    assert cli(str(ref), str(ref), "--ep", "cpu,openvino", "--require-no-fallback") == 0
    out = capsys.readouterr().out
    assert "OpenVINO: 6 of 6 nodes in 1 subgraph" in out
    assert cli(str(ref), str(broken), "--ep", "openvino") == 1


def test_openvino_fallback_is_named_and_fails_when_required(tmp_path, capsys):
    need_openvino()
    model = _save(onnx.parser.parse_model(HARDMAX), tmp_path / "hardmax.onnx")
    assert cli(str(model), str(model), "--ep", "openvino") == 0
    assert "fell back to CPU: " in capsys.readouterr().out
    report = validate(model, model, eps=("openvino",), samples=1, runs=1, require_no_fallback=True)
    ov = report.eps[0]
    assert ov.status == "failed" and any("--require-no-fallback" in e for e in ov.errors)
    assert {"n1_Hardmax"} <= {n["name"] for n in ov.placement.fallback}


def test_real_cls_model_on_openvino(tmp_path):
    if not CLS_MODEL.is_file():
        pytest.skip(f"{CLS_MODEL} missing; run `python fixtures/fetch_models.py`")
    need_openvino()
    model = onnx.load(CLS_MODEL)
    weight = next(
        n.attribute[0].t
        for n in model.graph.node  # PP-OCR keeps conv weights in Constant nodes
        if n.op_type == "Constant" and len(n.attribute[0].t.dims) == 4
    )
    weight.CopyFrom(nh.from_array(nh.to_array(weight) * 1.05, weight.name))
    broken = _save(model, tmp_path / "cls_broken.onnx")
    shapes = {"x": (1, 3, 48, 192)}
    good = validate(CLS_MODEL, CLS_MODEL, eps=("cpu", "openvino"), samples=2, runs=2, input_shapes=shapes)
    assert good.passed, good.format_table()
    ov = good.eps[1]
    assert ov.placement.on_target == ov.placement.total and ov.placement.subgraphs == 1
    assert ov.latency.ratio is not None
    bad = validate(CLS_MODEL, broken, eps=("openvino",), samples=2, runs=1, input_shapes=shapes)
    assert not bad.passed and bad.pass_checks[0].violations


def test_cuda_for_real(conv_models):
    """Runs where a GPU and onnxruntime-gpu (`onnxopt ep setup cuda`) exist; skips elsewhere with the reason."""
    reason = envs.gpu_absent_reason()
    if not reason:
        interp = envs.resolve_interpreter("cuda")
        reason = "" if interp.available else interp.reason
    if reason:
        pytest.skip(f"CUDA EP not testable here: {reason}")
    ref, _ = conv_models
    report = validate(ref, ref, eps=("cuda",), samples=2, runs=2)
    assert report.eps[0].status == "passed", report.format_table()
