"""`onnxopt diff`: tensor matching through the passes' rewrites, the first divergence, each layer's own
error, chunking, bisection over `--dump-dir`, and the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.api import optimize
from onnxopt.cli.app import main
from onnxopt.testing import model_from_text
from onnxopt.testing.models import conv_bn_relu
from onnxopt.verify.diff import DiffOptions, diff_models
from onnxopt.verify.diff.matching import match_tensors

#: Every layer int8, no timing (a tiny model is never faster in int8): the QDQ form diff must see through.
ALL_INT8 = "fold,fuse,quantize{latency_aware=false,check_latency=false,accuracy_aware=false,cache=false}"


def small_cnn() -> onnx.ModelProto:
    """Three Conv+Relu, a pooling and a classifier: a model whose every layer quantize turns into QDQ."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    return model_from_text(
        """
        small_cnn (float[1, 3, 16, 16] x) => (float[1, 10] y) {
            c1 = Conv <pads=[1,1,1,1]> (x, W1, B1)
            r1 = Relu (c1)
            c2 = Conv <pads=[1,1,1,1]> (r1, W2, B2)
            r2 = Relu (c2)
            c3 = Conv <pads=[1,1,1,1]> (r2, W3, B3)
            r3 = Relu (c3)
            p = GlobalAveragePool (r3)
            f = Flatten (p)
            g = Gemm (f, W4, B4)
            y = Softmax (g)
        }
        """,
        dict(W1=w(16, 3, 3, 3), B1=w(16), W2=w(16, 16, 3, 3), B2=w(16), W3=w(16, 16, 3, 3), B3=w(16))
        | dict(W4=w(16, 10), B4=w(10)),
    )


def samples(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def corrupt_weights_of(model: onnx.ModelProto, tensor: str, factor: float = 4.0) -> None:
    """Scale the int8 weight scale of the layer writing `tensor` (in place): a wrong scale, as a broken
    quantization would write."""
    node = next(n for n in model.graph.node if tensor in n.output)
    dq = next(n for n in model.graph.node if n.output[0] == node.input[1])
    assert dq.op_type == "DequantizeLinear"
    for t in model.graph.initializer:
        if t.name == dq.input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
            return
    raise AssertionError(f"no scale initializer for {tensor}")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple:
    d = tmp_path_factory.mktemp("diff")
    ref = small_cnn()
    onnx.save(ref, d / "ref.onnx")
    result = optimize(d / "ref.onnx", pipeline=ALL_INT8, calibration=samples(8), dump_dir=d / "dumps")
    result.save(d / "q.onnx")
    return d, ref, result.model


def test_matches_quantized_tensors_through_their_dequantize(quantized) -> None:
    _, ref, cand = quantized
    matches = {m.ref: m for m in match_tensors(ref, cand)}
    assert set(matches) == {"c1", "r1", "c2", "r2", "c3", "r3", "p", "f", "g", "y"}
    assert (matches["c1"].cand, matches["c1"].how) == ("c1_dq", "qdq")
    assert (matches["y"].cand, matches["y"].how) == ("y", "name")


def test_fused_tensors_are_not_matched_and_the_fused_output_is() -> None:
    ref = conv_bn_relu()
    fused = optimize(ref, pipeline="fuse").model
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    assert [m.ref for m in match_tensors(ref, fused)] == ["n", "y"]  # the Conv's own output "c" is gone


def test_correct_quantization_has_no_divergence(quantized) -> None:
    d, _, _ = quantized
    report = diff_models(d / "ref.onnx", d / "q.onnx", DiffOptions(data=samples()))
    assert report.tolerance == "quantize"
    assert report.first_divergence is None, report.format_text()
    assert all(t.sqnr_db is not None and t.sqnr_db > 20 for t in report.tensors)
    convs = [t for t in report.tensors if t.op == "Conv"]
    assert all(t.own_sqnr_db is not None and not t.own_problem for t in convs)


def test_corrupted_layer_is_named_first(quantized) -> None:
    d, _, cand = quantized
    bad = onnx.ModelProto()
    bad.CopyFrom(cand)
    corrupt_weights_of(bad, "c2")
    report = diff_models(d / "ref.onnx", bad, DiffOptions(data=samples()))
    first = report.first_divergence
    assert first is not None and first.ref == "c2" and first.op == "Conv"
    assert first.own_violations  # its own error, not one it received
    assert report.worst_layers(1)[0].ref == "c2"
    c3 = next(t for t in report.tensors if t.ref == "c3")
    assert c3.diverged and not c3.own_violations  # c3 only receives c2's error


def test_chunk_size_does_not_change_the_result(quantized) -> None:
    d, _, cand = quantized
    one = diff_models(d / "ref.onnx", d / "q.onnx", DiffOptions(data=samples(2), chunk=1))
    all_ = diff_models(d / "ref.onnx", d / "q.onnx", DiffOptions(data=samples(2), chunk=100))
    assert (one.chunks, all_.chunks) == (10, 1)
    assert [(t.ref, t.sqnr_db, t.own_sqnr_db) for t in one.tensors] == [
        (t.ref, t.sqnr_db, t.own_sqnr_db) for t in all_.tensors
    ]


def test_bisection_names_the_pass(quantized) -> None:
    d, _, cand = quantized
    dump = d / "dumps" / "03_quantize.onnx"
    bad = onnx.load(dump)
    corrupt_weights_of(bad, "c2")
    bad_dir = d / "bad_dumps"
    bad_dir.mkdir()
    for p in sorted((d / "dumps").iterdir()):
        (bad_dir / p.name).write_bytes(p.read_bytes())
    onnx.save(bad, bad_dir / dump.name)
    report = diff_models(d / "ref.onnx", bad, DiffOptions(data=samples(), dump_dir=bad_dir))
    assert report.bisect is not None and report.bisect["pass"] == "quantize", report.bisect
    clean = diff_models(d / "ref.onnx", d / "q.onnx", DiffOptions(data=samples(), dump_dir=d / "dumps"))
    assert clean.bisect is not None and clean.bisect["pass"] is None


def test_cli_exit_code_and_json(quantized, tmp_path, capsys) -> None:
    d, _, cand = quantized
    bad = onnx.ModelProto()
    bad.CopyFrom(cand)
    corrupt_weights_of(bad, "c3")
    onnx.save(bad, tmp_path / "bad.onnx")
    assert main(["diff", str(d / "ref.onnx"), str(d / "q.onnx"), "-q"]) == 0
    capsys.readouterr()
    assert main(["diff", str(d / "ref.onnx"), str(tmp_path / "bad.onnx"), "--json", "--chunk", "3"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "diff" and out["first_divergence"]["ref"] == "c3" and out["chunks"] == 4


def test_unrelated_candidate_is_a_user_error(tmp_path) -> None:
    onnx.save(small_cnn(), tmp_path / "a.onnx")
    other = model_from_text("other (float[1, 3, 16, 16] x) => (float[1, 3, 16, 16] z) { z = Relu (x) }")
    onnx.save(other, tmp_path / "b.onnx")
    assert main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 2
