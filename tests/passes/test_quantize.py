"""The quantize pass: integer kernels in onnxruntime's optimized graph, placement, weights, options."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.framework.context import PassContext
from onnxopt.framework.registry import get_pass
from onnxopt.ir.graph import import_model
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.passes.quantize.optimized import optimized_nodes, optimized_op_types
from onnxopt.runtime.sessions import make_session

NET = """
<ir_version: 8, opset_import: ["" : {opset}]>
net (float[1, 16, 24, W] x) => (float[1, 10] y) {{
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, W2, B2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    m = MatMul (f, M)
    s = Sigmoid (m)
    y = Gemm <transB = 1> (s, G, GB)
}}
"""


def _net(opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(NET.format(opset=opset))
    weights = {
        "W1": rng.standard_normal((64, 16, 3, 3)) * 0.2,
        "B1": rng.standard_normal(64) * 0.1,
        "W2": rng.standard_normal((64, 64, 3, 3)) * 0.1,
        "B2": rng.standard_normal(64) * 0.1,
        "M": rng.standard_normal((64, 96)) * 0.3,
        "G": rng.standard_normal((10, 96)) * 0.3,
        "GB": rng.standard_normal(10) * 0.1,
    }
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    return model


def _data(n: int = 6, widths=(32, 40, 48), seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16, 24, widths[i % len(widths)])).astype(np.float32)} for i in range(n)]


def _quantize(model, data=None, **opts):
    text = ",".join(f"{k}={v}" for k, v in opts.items())
    return onnxopt.optimize(
        model, pipeline=f"quantize{{{text}}}" if text else "quantize", calibration=data if data is not None else _data()
    )


def _pass_report(result):
    return next(p for p in result.report["passes"] if p.get("name", p.get("pass")) == "quantize")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))


def test_onnxruntime_fuses_integer_kernels_and_output_stays_close():
    model = _net()
    res = _quantize(model, latency_aware=False, accuracy_aware=False, check_latency=False)
    ops = collections.Counter(optimized_op_types(res.model))
    assert ops["QLinearConv"] == 2
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] == 1
    assert ops["QGemm"] == 1
    assert ops["Conv"] == 0 and ops["Gemm"] == 0 and ops["MatMul"] == 0
    x = _data(1, widths=(56,), seed=9)[0]  # a width not seen in calibration
    ref = make_session(model).run(None, x)[0]
    out = make_session(res.model).run(None, x)[0]
    assert sqnr_db(ref, out) > 20


def test_weights_int8_per_channel_on_the_right_axis_and_bias_int32():
    res = _quantize(_net(), latency_aware=False, accuracy_aware=False, check_latency=False)
    g = res.model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = {i: n for n in g.node for i in n.input}
    seen = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = inits[n.input[0]]
        user = consumers[n.output[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        role = "bias" if user.input[2:3] == [n.output[0]] else "weight"
        seen[(user.op_type, role)] = (q.dtype, axis, inits[n.input[1]].shape)
    assert seen[("Conv", "weight")] == (np.int8, 0, (64,))
    assert seen[("MatMul", "weight")] == (np.int8, 1, (96,))
    assert seen[("Gemm", "weight")] == (np.int8, 0, (10,))  # transB=1: [N, K], channels on axis 0
    assert seen[("Conv", "bias")][0] == np.int32 and seen[("Gemm", "bias")][0] == np.int32
    acts = [inits[n.input[2]].dtype for n in g.node if n.op_type == "QuantizeLinear"]
    assert acts and all(d == np.uint8 for d in acts)


def test_int8_symmetric_activations_and_per_tensor_option():
    res = _quantize(
        _net(), latency_aware=False, accuracy_aware=False, check_latency=False, activations="int8", per_channel=False
    )
    g = res.model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    zps = [inits[n.input[2]] for n in g.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.dtype == np.int8 and int(z) == 0 for z in zps)
    w_scales = [inits[n.input[1]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_w_q")]
    assert w_scales and all(s.ndim == 0 for s in w_scales)


def test_no_qdq_around_ops_that_gain_nothing():
    """One Q per quantized tensor: layer inputs, Conv and MatMul outputs (the MatMul feeds a float
    Sigmoid, yet gets its Q: whether onnxruntime fuses a float-output QDQ MatMul depends on the
    graph around it, QLinearMatMul always fuses); pooling gets none."""
    res = _quantize(_net(), latency_aware=False, accuracy_aware=False, check_latency=False)
    q_inputs = [n.input[0] for n in res.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs))
    producers = {o: n.op_type for n in res.model.graph.node for o in n.output}
    assert sorted(producers.get(t, "input") for t in q_inputs) == sorted(
        ["input", "Conv", "Relu", "Conv", "Flatten", "MatMul", "Sigmoid"]
    )


def test_pass_through_ops_share_the_scale_of_their_input():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    net (float[1, 8, 6, 6] x) => (float[1, 12] y) {
        c = Conv (x, W, B)
        r = Reshape (c, shape)
        y = MatMul (r, M)
    }
    """
    rng = np.random.default_rng(1)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B"),
            numpy_helper.from_array(np.array([1, 144], np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((144, 12)).astype(np.float32), "M"),
        ]
    )
    data = [{"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)} for _ in range(4)]
    res = _quantize(model, data, latency_aware=False, accuracy_aware=False, check_latency=False)
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    qs = {
        n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
        for n in res.model.graph.node
        if n.op_type == "QuantizeLinear"
    }
    conv_out = next(k for k in qs if k.startswith("c"))
    reshaped = next(k for k in qs if k.startswith("r"))
    assert qs[conv_out] == qs[reshaped]


def test_latency_aware_keeps_layers_float_where_int8_is_slower(monkeypatch):
    from onnxopt.runtime import timing

    def fake(self, key, models, feeds, runs=20):
        return [1.0, 2.0] if '"Conv"' in key else [2.0, 1.0]

    monkeypatch.setattr(timing.TimingCache, "measure", fake)
    res = _quantize(_net(), accuracy_aware=False, check_latency=False)
    rows = {r["op"] + r["node"]: r for r in _pass_report(res)["details"]}
    convs = [r for r in rows.values() if r["op"] == "Conv"]
    assert convs and all(not r["int8"] and "slower" in r["why"] for r in convs)
    assert all(r["int8"] for r in rows.values() if r["op"] in ("MatMul", "Gemm"))
    ops = collections.Counter(optimized_op_types(res.model))
    assert ops["QLinearConv"] == 0 and ops["QGemm"] == 1


def test_accuracy_aware_keeps_the_most_sensitive_layers_float():
    res = _quantize(_net(), latency_aware=False, check_latency=False, target_sqnr=500, max_float_layers=2)
    report = _pass_report(res)
    rows = report["details"]
    assert all("sensitivity_sqnr_db" in r for r in rows)
    floats = [r for r in rows if not r["int8"]]
    assert len(floats) == 2 and all(r["why"].startswith("sensitive") for r in floats)
    worst = sorted(rows, key=lambda r: r["sensitivity_sqnr_db"])[:2]
    assert {r["node"] for r in worst} == {r["node"] for r in floats}
    assert report["stats"]["int8_layers"] == 2 and 0 < report["stats"]["int8_mac_share"] < 1


def test_opset_below_13_is_upgraded_for_per_channel():
    res = _quantize(_net(opset=11), latency_aware=False, accuracy_aware=False, check_latency=False)
    opset = next(o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    assert any(a.name == "axis" for n in res.model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    assert "QLinearConv" in optimized_op_types(res.model)


def test_non_vnni_target_uses_7bit_weights_where_u8s8_would_saturate():
    model = _net()
    w = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w[:, :, 0, 0], w[:, :, 0, 1] = 1.0, 1.0  # adjacent large weights: u8 * s8 pair sums overflow int16
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, "W2"))
    res = _quantize(model, latency_aware=False, accuracy_aware=False, check_latency=False, vnni="no")
    rows = {r["node"]: r for r in _pass_report(res)["details"]}
    assert any("7-bit" in " ".join(r.get("notes", [])) for r in rows.values())
    inits = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    w2q = next(v for k, v in inits.items() if k.endswith("_w_q") and v.shape == (64, 64, 3, 3))
    assert np.abs(w2q.astype(int)).max() <= 63


def test_bias_of_a_near_zero_channel_stays_representable():
    model = _net()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    b = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w[3] = 1e-12
    b[3] = 50.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W1"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b, "B1"))
    res = _quantize(model, latency_aware=False, accuracy_aware=False, check_latency=False)
    rows = [r for r in _pass_report(res)["details"] if r["op"] == "Conv"]
    assert all(r["int8"] for r in rows)
    assert any("widened" in " ".join(r.get("notes", [])) for r in rows)


def test_include_exclude_and_calibration_required():
    res = _quantize(_net(), latency_aware=False, accuracy_aware=False, check_latency=False, op_types="Conv")
    assert all(r["op"] == "Conv" for r in _pass_report(res)["details"])
    res = _quantize(_net(), latency_aware=False, accuracy_aware=False, check_latency=False, exclude="Gemm|MatMul")
    ops = collections.Counter(optimized_op_types(res.model))
    assert ops["QGemm"] == 0 and ops["QLinearConv"] == 2
    with pytest.raises(onnxopt.errors.UserError):
        get_pass("quantize")().run(import_model(_net()), PassContext())


def test_real_cls_model_runs_integer_kernels(tmp_path):
    from fixtures.fetch_models import model_path

    path = model_path("cls")
    if not path.exists():
        pytest.skip("run `python fixtures/fetch_models.py` to fetch cls.onnx")
    from fixtures import ocr_data

    data = [{"x": x} for x, _ in ocr_data.cls_samples(8, 0)]
    res = onnxopt.optimize(
        str(path), pipeline="quantize{sensitivity_samples=4,latency_aware=false,check_latency=false}", calibration=data
    )
    ops = collections.Counter(optimized_op_types(res.model))
    assert ops["QLinearConv"] > 0
    stats = _pass_report(res)["stats"]
    assert stats["output_sqnr_db"] >= 30 - 1e-6 or stats["float_layers"] > 0
    x = ocr_data.cls_samples(1, 1)[0][0]
    assert np.isfinite(make_session(res.model).run(None, {"x": x})[0]).all()


def test_output_is_byte_identical_across_processes_given_the_cache(tmp_path):
    """Timing-based decisions (per layer and whole model) come from the disk cache, so a second process with
    the same input, options and $ONNXOPT_CACHE writes the same bytes."""
    import os
    import subprocess
    import sys

    model, data = _net(), _data(4)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([d["x"][0] for d in data[:1]] * 4))
    args = [
        "optimize",
        str(tmp_path / "m.onnx"),
        "-p",
        "quantize{sensitivity_samples=2}",
        "--calib",
        str(tmp_path / "calib.npz"),
    ]
    from onnxopt.cli import main

    assert main(args + ["-o", str(tmp_path / "a.onnx")]) == 0
    code = "import sys; from onnxopt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, ONNXOPT_PROGRESS="0")
    subprocess.run([sys.executable, "-c", code, *args, "-o", str(tmp_path / "b.onnx")], check=True, env=env)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_float_layers_store_int8_weights_that_onnxruntime_folds_at_load(monkeypatch):
    """Convs kept float (int8 slower) keep float compute but store int8 weights (Cast -> Mul), which
    onnxruntime folds at load: its optimized graph has no Cast/Mul; weight_storage=float keeps them."""
    from onnxopt.runtime import timing

    def fake(self, key, models, feeds, runs=20):
        return [1.0, 2.0] if '"Conv"' in key else [2.0, 1.0]

    monkeypatch.setattr(timing.TimingCache, "measure", fake)
    for storage in ("float", "int8"):
        res = _quantize(_net(), accuracy_aware=False, check_latency=False, weight_storage=storage)
        g = res.model.graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        assert not any(k in inits for k in ("M", "G")), "a quantized layer's float weight remains"
        assert ("W1" in inits and "W2" in inits) == (storage == "float")
        stored = [k for k, v in inits.items() if k.endswith("_wstore_q")]
        assert len(stored) == (2 if storage == "int8" else 0)
        assert all(inits[k].dtype == np.int8 for k in stored)
        ops = collections.Counter(optimized_op_types(res.model))
        assert ops["QLinearConv"] == 0 and ops["QGemm"] == 1 and ops["Cast"] == 0 and ops["Mul"] == 0
        rows = [r for r in _pass_report(res)["details"] if r["op"] == "Conv"]
        assert all(not r["int8"] and (r.get("weight_storage") == "int8") == (storage == "int8") for r in rows)
        x = _data(1, seed=5)[0]
        assert sqnr_db(make_session(_net()).run(None, x)[0], make_session(res.model).run(None, x)[0]) > 20


def test_storage_sqnr_keeps_the_weights_whose_rounding_costs_most_float(monkeypatch):
    """An unreachable storage budget keeps every weight float and says why; a loose one stores all
    but G (960 weights: under MIN_STORED_ELEMENTS, not worth two nodes)."""
    from onnxopt.runtime import timing

    monkeypatch.setattr(
        timing.TimingCache, "measure", lambda self, key, models, feeds, runs=20: [1.0, 2.0]
    )  # int8 never faster
    strict = _quantize(_net(), check_latency=False, storage_sqnr=150)
    rows = {r["node"]: r for r in _pass_report(strict)["details"]}
    gemm = next(k for k, r in rows.items() if r["op"] == "Gemm")
    assert "weight_storage" not in rows.pop(gemm)
    assert len(rows) == 3 and all(r["weight_storage"].startswith("float (rounding alone") for r in rows.values())
    assert {"W1", "W2", "M", "G"} <= {i.name for i in strict.model.graph.initializer}
    loose = _quantize(_net(), check_latency=False, storage_sqnr=10)
    rows = {r["node"]: r for r in _pass_report(loose)["details"]}
    rows.pop(gemm)
    assert all(r.get("weight_storage") == "int8" and r["storage_sqnr_db"] > 10 for r in rows.values())
    stats = _pass_report(loose)["stats"]
    assert stats["int8_stored_layers"] == 3 and stats["sqnr_storage_db"] >= 10


def test_unknown_weight_storage_is_a_user_error():
    from onnxopt.errors import UserError

    with pytest.raises(UserError, match="option 'weight_storage' = 'int4' is not allowed .allowed: one of int8, float"):
        _quantize(_net(), weight_storage="int4")


def test_bias_correction_gives_bias_less_convs_an_int32_bias():
    model = _net()
    conv = model.graph.node[0]
    del conv.input[2:]  # c1 = Conv(x, W1) without bias
    res = _quantize(model, latency_aware=False, accuracy_aware=False, check_latency=False, bias_correction="true")
    rows = {r["node"]: r for r in _pass_report(res)["details"]}
    assert all(r["int8"] for r in rows.values())
    q_conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    assert len(q_conv.input) == 3 and q_conv.input[2].endswith("_b_dq")
    x = _data(1, seed=3)[0]
    assert sqnr_db(make_session(model).run(None, x)[0], make_session(res.model).run(None, x)[0]) > 20


def test_timings_are_kept_per_cpu(monkeypatch, tmp_path):
    """A timing cache carried to another machine (a shared home, a baked image) must not decide
    there: the cache file is named for the CPU's model and instruction-set flags."""
    from onnxopt.runtime import timing

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    here = timing.TimingCache("quantize")
    here.put("layer", [1.0, 2.0])
    assert timing.cpu_fingerprint() in here.path.name
    monkeypatch.setattr(timing, "cpu_fingerprint", lambda: "another-cpu")
    elsewhere = timing.TimingCache("quantize")
    assert elsewhere.path != here.path and elsewhere.get("layer") is None
    assert timing.TimingCache("quantize", path=here.path).get("layer") == [1.0, 2.0]


MATMUL_ADD = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 64] x) => (float[1, 32] y) {
    h = MatMul (x, W1)
    r = Relu (h)
    m = MatMul (r, W2)
    y = Add (m, B2)
}
"""

CONV_TRANSPOSE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 16, 8, 8] x) => (float[1, 8, 16, 16] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, W1)
    r = Relu (h)
    y = ConvTranspose <strides = [2, 2]> (r, W2)
}
"""


def _with_weights(text: str, **shapes) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(
        numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), k) for k, shape in shapes.items()
    )
    return model


def _left_weight_dq(model: onnx.ModelProto) -> list[str]:
    """Weight DequantizeLinear nodes still in onnxruntime's optimized graph (run on every call)."""
    return [
        n.name
        for n in optimized_nodes(model)
        if n.op_type == "DequantizeLinear" and n.name.endswith("_w_DequantizeLinear")
    ]


def test_matmul_outputs_are_quantized_so_onnxruntime_fuses_them():
    """onnxruntime fuses no QDQ MatMul with a float output (a MatMul + Add becomes a float Gemm with
    the weight dequantized on every call), so a MatMul's output always gets its Q."""
    model = _with_weights(MATMUL_ADD, W1=(64, 96), W2=(96, 32), B2=(32,))
    data = [{"x": np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32)} for i in range(6)]
    res = _quantize(model, data, latency_aware=False, accuracy_aware=False, check_latency=False)
    assert all(r["int8"] for r in _pass_report(res)["details"])
    assert collections.Counter(optimized_op_types(res.model))["QLinearMatMul"] == 2
    assert not _left_weight_dq(res.model)


def test_a_layer_onnxruntime_leaves_unfused_stays_float(monkeypatch):
    """onnxruntime's CPU EP has no integer ConvTranspose: its weight's DequantizeLinear would run on
    every call. Even when the per-layer timings say int8 is faster, the pass sees the surviving
    DequantizeLinear in onnxruntime's optimized graph and keeps that layer float, the Conv int8."""
    from onnxopt.runtime import timing

    monkeypatch.setattr(timing.TimingCache, "measure", lambda self, key, models, feeds, runs=20: [2.0, 1.0])
    model = _with_weights(CONV_TRANSPOSE, W1=(32, 16, 3, 3), W2=(32, 8, 2, 2))
    data = [{"x": np.random.default_rng(i).standard_normal((1, 16, 8, 8)).astype(np.float32)} for i in range(6)]
    res = _quantize(model, data, accuracy_aware=False, check_latency=False)
    conv, deconv = _pass_report(res)["details"]  # in graph order
    assert conv["int8"], conv
    assert not deconv["int8"] and "unfused" in deconv["why"], deconv
    assert not _left_weight_dq(res.model)
