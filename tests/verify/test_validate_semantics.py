"""What `validate` judges and how it concludes (issue #14, item 8, and "validate passes a wrong candidate").

- the tolerance class follows the pipeline that made the candidate (its `metadata_props`);
- top-k agreement only for outputs that hold class scores, or that the user names;
- one verdict: the EP blocks and the result line never disagree;
- when the original fails too, the candidate is not blamed (inconclusive, exit 1);
- NaN where the original has other values, a changed dtype, or no EP run at all never pass.

Small models from onnx.parser; an "EP" that is the CPU EP behind a fake interpreter stands in
for a backend that miscomputes or crashes, so these run without OpenVINO.
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_validate import CONV

import onnxopt
from onnxopt.errors import UserError
from onnxopt.kernels.metrics import class_axis, distribution_rows, nonfinite_mismatch
from onnxopt.runtime.executor import LocalExecutor
from onnxopt.verify.comparison import class_score_outputs, merge_sample_metrics, sample_metrics
from onnxopt.verify.ep import envs
from onnxopt.verify.provenance import PIPELINE_KEY, TOLERANCE_KEY, record_provenance, recorded_provenance
from onnxopt.verify.tolerance import Tolerance
from onnxopt.verify.validate import validate
from onnxopt.verify.validate_cli import add_validate_arguments, run_validate_command

CLASSIFIER = CONV  # a small Conv classifier ending in Softmax (tests/verify/test_validate.py)
# a detector-like head: per anchor, 64 raw scores (no softmax) on a large common offset
BOXES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,84,16] x) => (float[1,84,64] boxes) <float[16,64] w = {%s}, float[1] off = {1000.0}> {
    m = MatMul(x, w)
    boxes = Add(m, off)
}
"""
# near-tied classes behind a softmax: 10% weight noise flips the top-1 class, cosine stays ~1
TIED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,16] x) => (float[1,64] prob) <float[16,64] w = {%s}> {
    m = MatMul(x, w)
    prob = Softmax(m)
}
"""
SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,6] x) => (float[2,6] y) <float[6] c = {%s}> {
    y = Mul(x, c)
}
"""
CAST = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,6] x) => (%s[2,6] y) {
    r = Relu(x)
    y = Cast<to = %d>(r)
}
"""
# a model that is valid ONNX but fails when run: the index 7 is out of bounds for the axis of 6
OUT_OF_BOUNDS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,6] x) => (float[2,1] y) <int64[1] i = {7}> {
    y = Gather<axis = 1>(x, i)
}
"""


def floats(a: np.ndarray) -> str:
    return ", ".join(repr(float(v)) for v in np.asarray(a, np.float32).ravel())


def save(text: str, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = onnx.parser.parse_model(text)
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"n{i}_{node.op_type}"
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_validate_arguments(parser)
    return run_validate_command(parser.parse_args([*argv, "--runs", "1", "--warmup", "0", "--samples", "4"]))


def consistent(report) -> bool:
    """The invariant of item 8: no EP block says PASSED under a FAILED verdict, none says other than
    PASSED (or allowed SKIPPED) under a PASSED verdict."""
    statuses = {e.status for e in report.eps}
    if report.verdict == "failed":
        return "passed" not in statuses
    if report.verdict == "passed":
        return statuses <= ({"passed", "skipped"} if report.allow_missing_ep else {"passed"})
    return "failed" not in statuses


# ---------------------------------------------------------------- tolerance from the candidate's record


@pytest.fixture
def classifier(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w, fc = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 5))
    return save(CLASSIFIER % (floats(w), floats(fc)), tmp_path / "ref.onnx"), w, fc


def test_tolerance_comes_from_the_candidates_metadata(classifier, tmp_path, capsys):
    ref, w, fc = classifier
    noisy = w + np.random.default_rng(1).standard_normal(w.shape) * 0.01  # ~40 dB: fine for int8, not exact
    text = CLASSIFIER % (floats(noisy), floats(fc))
    plain = save(text, tmp_path / "plain.onnx")
    marked = save(text, tmp_path / "marked.onnx", {PIPELINE_KEY: "fold,quantize", TOLERANCE_KEY: "quantize"})

    report = validate(ref, marked, samples=4, runs=1, warmup=0)
    assert report.passed and report.thresholds.tolerance == "quantize", report.format_table()
    assert "metadata" in report.tolerance_source and "fold,quantize" in report.tolerance_source
    unmarked = validate(ref, plain, samples=4, runs=1, warmup=0)
    assert not unmarked.passed and unmarked.thresholds.tolerance == "exact"
    assert unmarked.tolerance_source.startswith("default")

    asked = validate(ref, marked, samples=4, runs=1, warmup=0, tolerance="exact")  # the user's word wins
    assert not asked.passed and asked.tolerance_source == "the tolerance argument"
    assert any("records tolerance 'quantize'" in w for w in asked.warnings)

    assert cli(str(ref), str(marked)) == 0
    assert "tolerance quantize (from the candidate's metadata" in capsys.readouterr().out
    assert cli(str(ref), str(marked), "--tolerance", "exact") == 1
    assert "tolerance exact (from --tolerance)" in capsys.readouterr().out


def test_unknown_recorded_tolerance_is_ignored_with_a_warning(classifier, tmp_path):
    ref, _, _ = classifier
    odd = tmp_path / "odd.onnx"
    model = onnx.load(ref)
    model.metadata_props.add(key=TOLERANCE_KEY, value="anything-goes")
    onnx.save(model, odd)
    report = validate(ref, odd, samples=2, runs=1, warmup=0)
    assert report.thresholds.tolerance == "exact" and any("anything-goes" in w for w in report.warnings)


def test_optimize_records_the_pipeline_and_its_tolerance(classifier, tmp_path):
    ref, _, _ = classifier
    folded = onnxopt.optimize(ref, pipeline="fold").model
    assert recorded_provenance(folded) == ("exact", "fold")
    record_provenance(folded, "prune{ratio=0.1}", "approximate")  # optimized again: loosest of both
    assert recorded_provenance(folded) == ("approximate", "fold ; prune{ratio=0.1}")
    record_provenance(folded, "fold", "exact")
    assert recorded_provenance(folded) == ("approximate", "fold ; prune{ratio=0.1} ; fold")
    assert [p.key for p in folded.metadata_props].count(TOLERANCE_KEY) == 1


def test_readme_example_passes_on_a_quantized_candidate(classifier, tmp_path):
    """README: `validate("rec.onnx", "rec.int8.onnx", eps=[...], data="calib/")` then `assert report.passed`."""
    ref, _, _ = classifier
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(16)]
    # int8 on every layer even where slower: an 8x8 model is never faster in int8
    pipeline = "fold,quantize{latency_aware=false,accuracy_aware=false,check_latency=false}"
    result = onnxopt.optimize(ref, pipeline=pipeline, calibration=calib)
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)  # really quantized
    cand = result.save(tmp_path / "ref.int8.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    for i in range(6):
        np.savez(data / f"{i}.npz", x=rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    eps = ["cpu"] + (["openvino"] if envs.resolve_interpreter("openvino").available else [])
    report = validate(ref, cand, eps=eps, data=str(data))
    assert report.thresholds.tolerance == "quantize" and "metadata" in report.tolerance_source
    assert report.passed, report.format_table()


# ---------------------------------------------------------------- top-k only for class scores


def test_class_scores_are_recognised_conservatively():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 7, 10))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert distribution_rows(probs, -1) and distribution_rows(np.log(probs), -1)
    assert not distribution_rows(logits, -1) and not distribution_rows(probs * 1.1, -1)
    assert class_axis((1, 1000, 1, 1)) == 1 and class_axis((1, 84, 2100)) == 2 and class_axis((1, 1)) is None
    squeezed = probs[0, :1, :, None, None].astype(np.float32)  # [1, 10, 1, 1], as squeezenet writes it
    outputs = {"p": probs.astype(np.float32), "logp": np.log(probs), "boxes": logits, "map": squeezed}
    assert class_score_outputs(outputs) == {"p", "logp", "map"}
    assert class_score_outputs(outputs, ["boxes"]) == {"boxes"}


def test_box_tensor_is_not_judged_by_topk(tmp_path):
    """An int8-like detector output at high SQNR/cosine whose per-row argmax is noise must pass quantize."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64))
    ref = save(BOXES % floats(w), tmp_path / "det.onnx")
    cand = save(
        BOXES % floats(w * (1 + 0.2 * rng.standard_normal(w.shape))),
        tmp_path / "det.q.onnx",
        {TOLERANCE_KEY: "quantize"},
    )
    report = validate(ref, cand, samples=3, runs=1, warmup=0)
    pass_check = report.pass_checks[0]
    assert pass_check.topk is None and pass_check.sqnr_db > 40 and pass_check.cosine > 0.9999
    assert report.passed, report.format_table()
    named = validate(ref, cand, samples=3, runs=1, warmup=0, topk_outputs=["boxes"])
    assert named.pass_checks[0].topk < 0.9 and not named.passed  # the same tensor, judged as class scores
    with pytest.raises(UserError, match="not an output"):
        validate(ref, cand, samples=1, runs=1, topk_outputs=["scores"])


def test_topk_outputs_flag(tmp_path, capsys):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64))
    ref = save(BOXES % floats(w), tmp_path / "det.onnx")
    cand = save(
        BOXES % floats(w * (1 + 0.2 * rng.standard_normal(w.shape))),
        tmp_path / "det.q.onnx",
        {TOLERANCE_KEY: "quantize"},
    )
    assert cli(str(ref), str(cand)) == 0
    assert cli(str(ref), str(cand), "--topk-outputs", "boxes") == 1
    assert "top1 agreement" in capsys.readouterr().out


# ---------------------------------------------------------------- one consistent verdict


def test_topk_failure_fails_the_ep_block_too(tmp_path):
    """Under `quantize`, top-1 of near-tied softmax classes breaks while cosine/SQNR hold: the pass check
    failed and the EP block used to say PASSED (its end-to-end limits dropped top-k)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)) * 0.05
    ref = save(TIED % floats(w), tmp_path / "tied.onnx")
    cand = save(
        TIED % floats(w + rng.standard_normal(w.shape) * 0.02), tmp_path / "tied.q.onnx", {TOLERANCE_KEY: "quantize"}
    )
    report = validate(ref, cand, samples=8, runs=1, warmup=0)
    pass_check = report.pass_checks[0]
    assert pass_check.topk < 0.9 and pass_check.cosine > 0.99, report.format_table()
    cpu = report.eps[0]
    assert cpu.status == "failed" and any(c.check == "e2e" and c.violations for c in cpu.checks)
    assert report.verdict == "failed" and consistent(report)
    assert "cpu [FAILED]" in report.format_table() and "result: FAILED" in report.format_table()


def test_pass_check_failure_is_carried_into_every_ep_block(classifier, tmp_path):
    """CAND breaks exact on CPU; a lenient backend limit alone would let its EP block pass."""
    ref, w, fc = classifier
    cand = save(CLASSIFIER % (floats(w * 1.001), floats(fc)), tmp_path / "off.onnx")
    report = validate(ref, cand, samples=2, runs=1, warmup=0)
    assert report.pass_checks[0].violations and report.verdict == "failed"
    assert all(e.status == "failed" for e in report.eps) and consistent(report)


# ---------------------------------------------------------------- when the original fails too


def fake_ep(tmp_path: Path, scale_ref: float, scale_cand: float, kill_cand: bool = False) -> str:
    """An 'OpenVINO interpreter' that is the CPU EP in disguise and miscomputes on purpose.

    It multiplies the outputs of REF's runs by `scale_ref` and of CAND's by `scale_cand`
    (a backend that gets a model wrong), or kills CAND's worker (a backend that crashes on it).
    """
    fake = tmp_path / "fake-ov-python"
    probe = json.dumps(
        {"version": "fake", "providers": ["OpenVINOExecutionProvider", "CPUExecutionProvider"], "python": "3"}
    )
    fake.write_text(f"""#!{sys.executable}
import json, os, signal, subprocess, sys
import numpy as np
if sys.argv[1] == "-c":
    print({probe!r})
    sys.exit(0)
worker, request = sys.argv[1], sys.argv[2]
req = json.load(open(request))
is_cand = "cand" in os.path.basename(req["model"])
if is_cand and {kill_cand!r}:
    os.kill(os.getpid(), signal.SIGKILL)
req["provider"], req["provider_options"] = "CPUExecutionProvider", {{}}
json.dump(req, open(request, "w"))
code = subprocess.call([sys.executable, worker, request])
scale = {scale_cand!r} if is_cand else {scale_ref!r}
if code == 0 and req.get("outputs") and scale != 1.0:
    with np.load(req["outputs"]) as z:
        arrays = {{k: z[k] * np.float32(scale) for k in z.files}}
    np.savez(req["outputs"], **arrays)
sys.exit(code)
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


@pytest.fixture
def pair(classifier, tmp_path) -> tuple[Path, Path]:
    ref, _, _ = classifier
    cand = tmp_path / "cand.onnx"
    cand.write_bytes(ref.read_bytes())
    return ref, cand


def test_backend_that_gets_the_original_wrong_too_is_inconclusive(pair, tmp_path, capsys):
    ref, cand = pair
    ov = {"openvino": fake_ep(tmp_path, 1.3, 1.3)}
    report = validate(ref, cand, eps=("cpu", "openvino"), samples=2, runs=1, warmup=0, ep_python=ov)
    cpu, bad = report.eps
    assert cpu.status == "passed"
    assert bad.status == "inconclusive" and "the original fails here too" in bad.reason
    assert bad.ref_checks and bad.ref_checks[0].violations
    assert report.verdict == "inconclusive" and not report.passed and consistent(report)
    table = report.format_table()
    assert "openvino [INCONCLUSIVE]" in table and "openvino: the original fails here too" in table
    assert "the original on this EP" in table

    code = cli(str(ref), str(cand), "--ep", "cpu,openvino", "--ep-python", f"openvino={ov['openvino']}")
    assert code == 1 and "result: INCONCLUSIVE" in capsys.readouterr().out


def test_backend_that_gets_only_the_candidate_wrong_fails_it(pair, tmp_path):
    ref, cand = pair
    report = validate(
        ref, cand, eps=("openvino",), samples=2, runs=1, warmup=0, ep_python={"openvino": fake_ep(tmp_path, 1.0, 1.3)}
    )
    ov = report.eps[0]
    assert ov.status == "failed" and not ov.ref_checks[0].violations and report.verdict == "failed"


def test_candidate_crash_where_the_original_runs_is_the_candidates_failure(pair, tmp_path):
    ref, cand = pair
    report = validate(
        ref,
        cand,
        eps=("openvino",),
        samples=2,
        runs=1,
        warmup=0,
        ep_python={"openvino": fake_ep(tmp_path, 1.0, 1.0, kill_cand=True)},
    )
    ov = report.eps[0]
    assert ov.status == "failed" and "SIGKILL" in ov.errors[0] and report.verdict == "failed"


def test_sharded_path_reaches_the_same_conclusion(pair, tmp_path):
    ref, cand = pair
    ov = {"openvino": fake_ep(tmp_path, 1.3, 1.3)}
    with LocalExecutor(2) as pool:
        got = validate(ref, cand, eps=("cpu", "openvino"), samples=3, runs=1, warmup=0, ep_python=ov, executor=pool)
    single = validate(ref, cand, eps=("cpu", "openvino"), samples=3, runs=1, warmup=0, ep_python=ov)
    assert (
        [(e.ep, e.status) for e in got.eps]
        == [(e.ep, e.status) for e in single.eps]
        == [("cpu", "passed"), ("openvino", "inconclusive")]
    )
    assert [c.cosine for c in got.eps[1].ref_checks] == [c.cosine for c in single.eps[1].ref_checks]


def test_original_failing_on_the_cpu_ep_is_not_the_candidates_fault(tmp_path, capsys):
    ref = save(OUT_OF_BOUNDS, tmp_path / "ref.onnx")
    cand = save(OUT_OF_BOUNDS, tmp_path / "cand.onnx")
    report = validate(ref, cand, samples=1, runs=1, warmup=0)
    assert report.ref_errors and not report.pass_errors
    assert report.verdict == "inconclusive" and report.eps[0].status == "inconclusive"
    assert cli(str(ref), str(cand)) == 1
    out = capsys.readouterr().out
    assert "the original fails here" in out and "result: INCONCLUSIVE (the original model fails" in out


# ---------------------------------------------------------------- wrong candidates that used to pass


def test_nan_in_the_reference_does_not_hide_a_wrong_candidate(tmp_path):
    c = np.arange(1, 7, dtype=np.float32)
    c[0] = np.nan
    ref = save(SCALED % floats(c), tmp_path / "ref.onnx")
    scaled = save(SCALED % floats(c * 1.5), tmp_path / "scaled.onnx")  # NaN where REF has it, rest wrong
    moved = c.copy()
    moved[0], moved[1] = 1.0, np.nan
    shifted = save(SCALED % floats(moved), tmp_path / "moved.onnx")  # as many NaNs, elsewhere
    assert validate(ref, ref, samples=2, runs=1, warmup=0).passed
    wrong = validate(ref, scaled, samples=2, runs=1, warmup=0, tolerance="quantize")
    assert not wrong.passed and wrong.pass_checks[0].cosine is not None, wrong.format_table()
    assert wrong.pass_checks[0].max_abs > 0
    other = validate(ref, shifted, samples=2, runs=1, warmup=0, tolerance="quantize")
    assert not other.passed and other.pass_checks[0].nonfinite == 2 * 2 * 2  # 2 entries x 2 rows x 2 samples
    assert "NaN/Inf entries where the original has other values" in other.format_table()


def test_new_nan_fails_and_metrics_ignore_nan():
    ref = {"y": np.array([[1.0, 2.0, 3.0]], np.float32)}
    cand = {"y": np.array([[1.0, np.nan, 3.0]], np.float32)}
    rows = [sample_metrics(ref, cand, 1)]
    check = merge_sample_metrics("pass", rows, Tolerance.QUANTIZE.pass_)[0]
    assert check.violations and check.nonfinite == 1 and check.cosine == pytest.approx(1.0)
    assert nonfinite_mismatch(np.array([np.inf, -np.inf, np.nan]), np.array([np.inf, np.inf, np.nan])) == 1


def test_changed_output_dtype_fails(tmp_path):
    ref = save(CAST % ("int64", onnx.TensorProto.INT64), tmp_path / "ref.onnx")
    cand = save(CAST % ("int32", onnx.TensorProto.INT32), tmp_path / "cand.onnx")
    report = validate(ref, cand, samples=2, runs=1, warmup=0, tolerance="quantize")
    assert not report.passed and "dtype int32, expected int64" in report.pass_checks[0].violations[0]
    assert all(e.status == "failed" for e in report.eps)


def test_an_ep_that_never_ran_is_not_a_pass(classifier, capsys):
    ref, _, _ = classifier
    missing = ["--ep-python", "openvino=/nonexistent/python"]
    assert cli(str(ref), str(ref), "--ep", "openvino", *missing) == 1
    out = capsys.readouterr().out
    assert "result: INCONCLUSIVE" in out and "not run here: openvino" in out and "no EP was judged" in out
    # allowed missing, but nothing else judged: still not a pass
    assert cli(str(ref), str(ref), "--ep", "openvino", "--allow-missing-ep", *missing) == 1
    assert cli(str(ref), str(ref), "--ep", "cpu,openvino", *missing) == 1
    assert cli(str(ref), str(ref), "--ep", "cpu,openvino", "--allow-missing-ep", *missing) == 0
    assert "result: PASSED (not run here: openvino (allowed by --allow-missing-ep))" in capsys.readouterr().out


def test_optimize_validate_judges_with_the_recorded_tolerance(classifier, tmp_path, capsys):
    from onnxopt.cli import main

    ref, _, _ = classifier
    out = tmp_path / "folded.onnx"
    report = tmp_path / "v.json"
    code = main(
        [
            "optimize",
            str(ref),
            "-o",
            str(out),
            "-p",
            "fold",
            "--quiet",
            "--validate",
            "cpu",
            "--validate-samples",
            "2",
            "--validate-runs",
            "1",
            "--validate-report",
            str(report),
        ]
    )
    assert code == 0, capsys.readouterr()
    saved = json.loads(report.read_text())
    assert saved["verdict"] == "passed" and saved["thresholds"]["tolerance"] == "exact"
    assert saved["tolerance_source"].startswith("the candidate's metadata")
    assert recorded_provenance(onnx.load(out)) == ("exact", "fold")
