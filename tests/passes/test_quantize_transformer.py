"""The quantize pass on transformer encoders (issue #16): the dynamic MatMul form, one
DynamicQuantizeLinear per shared input, no Q/DQ next to LayerNormalization and Softmax unless
measured safe, int8 storage of lookup tables and of com.microsoft Attention weights."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.passes.quantize.optimized import optimized_op_types
from onnxopt.runtime.sessions import make_session

H = 64
ENCODER = f"""
<ir_version: 8, opset_import: ["" : 17]>
enc (float[1, 16, {H}] x) => (float[1, 16, {H}] y) {{
    ln = LayerNormalization <axis = -1> (x, G, BT)
    q = MatMul (ln, WQ)
    k = MatMul (ln, WK)
    v = MatMul (ln, WV)
    kt = Transpose <perm = [0, 2, 1]> (k)
    s = MatMul (q, kt)
    p = Softmax <axis = -1> (s)
    a = MatMul (p, v)
    o = MatMul (a, WO)
    ob = Add (o, BO)
    r = Add (ob, x)
    y = LayerNormalization <axis = -1> (r, G, BT)
}}
"""

EMBEDDING = f"""
<ir_version: 8, opset_import: ["" : 17]>
emb (int64[1, 16] ids) => (float[1, 16, {H}] y) {{
    e = Gather (E, ids)
    shp = Shape (e)
    i0 = Constant <value = int64[1] {{2}}> ()
    d = Gather (shp, i0)
    m = MatMul (e, W)
    y = LayerNormalization <axis = -1> (m, G, BT)
}}
"""

ATTENTION = f"""
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
att (float[1, 16, {H}] x) => (float[1, 16, {H}] y) {{
    a = com.microsoft.Attention <num_heads = 4> (x, QKV, QKVB)
    o = MatMul (a, WO)
    y = LayerNormalization <axis = -1> (o, G, BT)
}}
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))


def _model(text: str, **shapes) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(text)
    values = {k: rng.standard_normal(s) * 0.2 for k, s in shapes.items()}
    if "G" in values:  # LayerNorm gammas with a few outlier channels, as trained encoders have
        values["G"] = np.where(np.arange(H) % 16 == 3, 12.0, 1.0)
        values["BT"] = np.zeros(H)
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in values.items())
    return model


def _encoder() -> onnx.ModelProto:
    return _model(ENCODER, G=(H,), BT=(H,), WQ=(H, H), WK=(H, H), WV=(H, H), WO=(H, H), BO=(H,))


def _x(n: int = 6) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).standard_normal((1, 16, H)).astype(np.float32)} for i in range(n)]


def _ids(n: int = 6) -> list[dict[str, np.ndarray]]:
    return [{"ids": np.random.default_rng(i).integers(0, 2000, (1, 16)).astype(np.int64)} for i in range(n)]


def _quantize(model, data, **opts):
    text = ",".join(f"{k}={v}" for k, v in opts.items())
    return onnxopt.optimize(model, pipeline=f"quantize{{{text}}}", calibration=data)


def _report(result) -> dict:
    return next(p for p in result.report["passes"] if p.get("name", p.get("pass")) == "quantize")


def _rows(result) -> dict[str, dict]:
    return {r["node"]: r for r in _report(result)["details"]}


def _sqnr(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    return sqnr_db(make_session(a).run(None, feeds)[0], make_session(b).run(None, feeds)[0])


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _weights_q(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_w_q")}


UNTIMED = {"latency_aware": "false", "accuracy_aware": "false", "check_latency": "false"}


def test_dynamic_form_shares_one_dynamic_quantize_per_input_and_onnxruntime_fuses_it():
    model = _encoder()
    res = _quantize(model, _x(), matmul_form="dynamic", smooth="off", **UNTIMED)  # the forms alone
    ops = _ops(res.model)
    assert ops["DynamicQuantizeLinear"] == 2  # one for q/k/v (the LayerNorm output), one for o
    assert ops["MatMulInteger"] == 4 and ops["MatMul"] == 2  # activation x activation MatMuls stay float
    assert ops["QuantizeLinear"] == 0 and ops["DequantizeLinear"] == 0  # nothing on LayerNorm/Softmax
    fused = collections.Counter(optimized_op_types(res.model))
    assert fused["MatMulInteger"] == 0
    assert fused["MatMulIntegerToFloat"] + fused["DynamicQuantizeMatMul"] == 4
    rows = _rows(res)
    assert all(rows[f"MatMul_{i}"]["form"] == "dynamic" for i in (1, 2, 3))
    assert _sqnr(model, res.model, _x(1)[0]) > 20  # per-tensor input ranges, LayerNorm outlier channels


@pytest.mark.parametrize(("vnni", "qmax"), [("no", 63), ("yes", 127)])
def test_dynamic_weights_are_7bit_without_vnni(vnni, qmax):
    """DynamicQuantizeLinear is uint8, so without VNNI u8s8 pair sums could saturate: 7-bit weights."""
    res = _quantize(_encoder(), _x(), matmul_form="dynamic", vnni=vnni, **UNTIMED)
    weights = _weights_q(res.model)
    assert len(weights) == 4
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights.values()) == qmax


def test_auto_puts_no_static_qdq_next_to_layernorm_unless_measured_as_accurate(monkeypatch):
    """Static is timed faster everywhere; next to the LayerNorm (outlier channels) it is less
    accurate than dynamic, so q/k/v take the dynamic form and say why."""
    from onnxopt.runtime import timing

    def measure(self, key, models, feeds, runs=20):
        return [2.0, 1.5] if "dynamic" in key else [2.0, 1.0]

    monkeypatch.setattr(timing.TimingCache, "measure", measure)
    res = _quantize(_encoder(), _x(), accuracy_aware="false", check_latency="false")
    rows = _rows(res)
    for name in ("MatMul_1", "MatMul_2", "MatMul_3"):
        row = rows[name]
        assert row["int8"] and row["dynamic_latency_ratio"] == 0.75 and row["int8_latency_ratio"] == 0.5
        if row["form"] == "static":
            assert row["static_sqnr_db"] >= row["dynamic_sqnr_db"], row
        else:
            assert "next to LayerNormalization" in row["form_why"], row
    assert any(rows[n]["form"] == "dynamic" for n in ("MatMul_1", "MatMul_2", "MatMul_3"))


def test_static_form_is_kept_when_asked_and_untimed_cnn_layers_stay_static():
    res = _quantize(_encoder(), _x(), matmul_form="static", **UNTIMED)
    assert _ops(res.model)["DynamicQuantizeLinear"] == 0
    assert all(r.get("form") == "static" for r in _report(res)["details"] if r.get("int8"))


def test_lookup_table_stores_int8_rows_that_onnxruntime_folds_at_load():
    model = _model(EMBEDDING, E=(2000, H), W=(H, H), G=(H,), BT=(H,))
    res = _quantize(model, _ids(), **UNTIMED)
    rows = _rows(res)
    table = next(r for r in rows.values() if r["op"] == "Gather")
    assert table["weight_storage"] == "int8", table
    assert len([r for r in rows.values() if r["op"] == "Gather"]) == 1  # the Gather of a shape is no table
    stored = {t.name: t for t in res.model.graph.initializer}
    assert stored["E_wstore_q"].data_type == onnx.TensorProto.INT8
    assert "E" not in stored
    assert collections.Counter(optimized_op_types(res.model))["Cast"] == 0  # folded back at load
    assert _sqnr(model, res.model, _ids(1)[0]) > 30
    assert res.model.ByteSize() < 0.4 * model.ByteSize()


def _attention() -> onnx.ModelProto:
    return _model(ATTENTION, QKV=(H, 3 * H), QKVB=(3 * H,), WO=(H, H), G=(H,), BT=(H,))


def test_attention_weight_is_stored_int8_and_attention_stays_fused():
    model = _attention()
    res = _quantize(model, _x(), int8_attention="false", **UNTIMED)
    row = next(r for r in _report(res)["details"] if r["op"] == "Attention")
    assert row["weight_storage"] == "int8", row
    assert "QKV" not in {t.name for t in res.model.graph.initializer}
    assert collections.Counter(optimized_op_types(res.model))["Attention"] == 1
    assert collections.Counter(optimized_op_types(res.model))["Cast"] == 0
    assert _sqnr(model, res.model, _x(1)[0]) > 30


def test_attention_computes_in_int8_as_qattention_that_onnxruntime_keeps():
    model = _attention()
    res = _quantize(model, _x(), matmul_form="dynamic", vnni="no", **UNTIMED)
    ops = _ops(res.model)
    assert ops["QAttention"] == 1 and ops["Attention"] == 0 and ops["DynamicQuantizeLinear"] == 2
    q = next(n for n in res.model.graph.node if n.op_type == "QAttention")
    assert q.domain == "com.microsoft" and onnx.helper.get_attribute_value(q.attribute[0]) == 4
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert inits[q.input[4]].shape == (3 * H,)  # one weight scale per output column
    assert int(np.abs(inits[q.input[1]].astype(np.int32)).max()) == 63  # 7-bit without VNNI
    assert collections.Counter(optimized_op_types(res.model))["QAttention"] == 1
    row = next(r for r in _report(res)["details"] if r["op"] == "Attention")
    assert row["int8"] and row["form"] == "dynamic" and "QAttention" in row["form_why"], row
    assert _sqnr(model, res.model, _x(1)[0]) > 25


def test_attention_with_a_mask_keeps_it_and_a_slower_qattention_stays_float(monkeypatch):
    from onnxopt.runtime import timing

    text = ATTENTION.replace("float[1, 16, 64] x)", "float[1, 16, 64] x, int32[1, 16] m)").replace(
        "(x, QKV, QKVB)", "(x, QKV, QKVB, m)"
    )
    model = _model(text, QKV=(H, 3 * H), QKVB=(3 * H,), WO=(H, H), G=(H,), BT=(H,))
    mask = np.ones((1, 16), np.int32)
    mask[0, 10:] = 0
    data = [{**d, "m": mask} for d in _x()]
    res = _quantize(model, data, matmul_form="dynamic", **UNTIMED)
    q = next(n for n in res.model.graph.node if n.op_type == "QAttention")
    assert q.input[5] == "m"
    assert _sqnr(model, res.model, data[0]) > 25

    monkeypatch.setattr(timing.TimingCache, "measure", lambda self, key, models, feeds, runs=20: [1.0, 2.0])
    res = _quantize(model, data, accuracy_aware="false", check_latency="false")
    row = next(r for r in _report(res)["details"] if r["op"] == "Attention")
    assert not row["int8"] and "slower" in row["why"], row
    assert _ops(res.model)["QAttention"] == 0 and _ops(res.model)["Attention"] == 1


def test_attention_with_qkv_hidden_sizes_gets_no_qattention_and_says_why():
    text = ATTENTION.replace("<num_heads = 4>", f"<num_heads = 4, qkv_hidden_sizes = [{H}, {H}, {H}]>")
    model = _model(text, QKV=(H, 3 * H), QKVB=(3 * H,), WO=(H, H), G=(H,), BT=(H,))
    res = _quantize(model, _x(), matmul_form="dynamic", **UNTIMED)
    assert _ops(res.model)["QAttention"] == 0 and _ops(res.model)["Attention"] == 1
    skipped = _report(res)["skipped"]
    assert any("qkv_hidden_sizes" in s["reason"] for s in skipped), skipped


LN_RESIDUAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
res (float[1, 16, {H}] x) => (float[1, 16, {H}] y) {{
    ln = LayerNormalization <axis = -1> (x, G, BT)
    q = MatMul (ln, WQ)
    y = Add (q, ln)
}}
"""


def _smoothing_stats(res) -> dict:
    return _report(res)["stats"]


def test_smoothing_is_exact_in_float():
    from onnxopt.passes.quantize.smoothing import smoothed_model, smoothing_sites
    from onnxopt.passes.quantize.state import Constants

    model = _encoder()
    consts = Constants(model)
    sites, skipped = smoothing_sites(model, consts)
    sites = [s for s in sites if s.norm is not None]  # the others are MatMul inputs without a LayerNorm
    assert [s.tensor for s in sites] == ["ln"] and len(sites[0].readers) == 3
    assert [s["reason"] for s in skipped] == ["not smoothed: its output is a graph output or unread"]
    sites[0].absmax = np.abs(make_session(_with_ln_output(model)).run(["ln"], _x(1)[0])[0]).max(axis=(0, 1))
    smoothed = smoothed_model(model, consts, sites, [0.8])
    feeds = _x(1)[0]
    a, b = make_session(model).run(None, feeds)[0], make_session(smoothed).run(None, feeds)[0]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # float rounding only
    gamma = {t.name: numpy_helper.to_array(t) for t in smoothed.graph.initializer}
    assert not np.allclose(gamma[smoothed.graph.node[0].input[1]], gamma["G"])  # the outliers moved


def _with_ln_output(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.helper.make_tensor_value_info("ln", onnx.TensorProto.FLOAT, None))
    return out


def test_smoothing_raises_int8_sqnr_and_off_leaves_the_layernorm_alone():
    model = _encoder()
    on = _quantize(model, _x(), matmul_form="dynamic", **UNTIMED)
    off = _quantize(model, _x(), matmul_form="dynamic", smooth="off", **UNTIMED)
    stats = _smoothing_stats(on)
    assert stats["smoothed_layernorms"] == 1
    entry = stats["smoothing"][0]
    assert entry["strength"] in (0.5, 0.65, 0.8) and entry["readers_sqnr_db"][1] > entry["readers_sqnr_db"][0]
    assert _smoothing_stats(off)["smoothed_layernorms"] == 0
    assert stats["output_sqnr_db"] > _smoothing_stats(off)["output_sqnr_db"]  # on the calibration samples
    ln_off = next(n for n in off.model.graph.node if n.op_type == "LayerNormalization")
    assert ln_off.input[1] == "G"  # smooth=off: the LayerNorm keeps its gamma


def test_layernorm_also_read_by_a_residual_add_is_smoothed_with_the_residual_restored():
    """The residual reader gets the LayerNorm output multiplied back by s: exact in float, and the
    MatMul reader sees the flattened channels."""
    from onnxopt.passes.quantize.smoothing import smoothed_model, smoothing_sites
    from onnxopt.passes.quantize.state import Constants

    model = _model(LN_RESIDUAL, G=(H,), BT=(H,), WQ=(H, H))
    consts = Constants(model)
    sites, _ = smoothing_sites(model, consts)
    site = next(s for s in sites if s.norm is not None)
    assert [u.op_type for u in site.readers] == ["MatMul"] and [u.op_type for u in site.others] == ["Add"]
    site.absmax = np.abs(make_session(_with_ln_output(model)).run(["ln"], _x(1)[0])[0]).max(axis=(0, 1))
    smoothed = smoothed_model(model, consts, [site], [0.8])
    onnx.checker.check_model(smoothed, full_check=True)
    feeds = _x(1)[0]
    np.testing.assert_allclose(
        make_session(model).run(None, feeds)[0], make_session(smoothed).run(None, feeds)[0], rtol=1e-4, atol=1e-4
    )
    add = next(n for n in smoothed.graph.node if n.op_type == "Add")
    mul = next(n for n in smoothed.graph.node if n.op_type == "Mul")
    ln = next(n for n in smoothed.graph.node if n.op_type == "LayerNormalization")
    # the smoothed values get a name of their own; "ln" keeps its float values (what `diff` matches by)
    assert ln.output[0] != "ln" and mul.input[0] == ln.output[0] and mul.output[0] == "ln" and "ln" in add.input
    res = _quantize(model, _x(), matmul_form="dynamic", **UNTIMED)
    stats = _smoothing_stats(res)
    assert stats["smoothed_layernorms"] == 1 and stats["smoothing"][0]["how"] == "into the LayerNorm"
    off = _quantize(model, _x(), matmul_form="dynamic", smooth="off", **UNTIMED)
    assert stats["output_sqnr_db"] > _smoothing_stats(off)["output_sqnr_db"]


SCALED_INPUT = f"""
<ir_version: 8, opset_import: ["" : 17]>
act (float[1, 16, {H}] x) => (float[1, 16, {H}] y) {{
    h = Mul (x, C)
    y = MatMul (h, W)
}}
"""


def _scaled(outliers: bool) -> onnx.ModelProto:
    model = _model(SCALED_INPUT, W=(H, H))
    c = np.where((np.arange(H) % 16 == 3) & outliers, 30.0, 1.0).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(c, "C"))
    return model


def test_layer_input_with_outlier_channels_and_no_layernorm_gets_a_dividing_mul():
    model = _scaled(outliers=True)
    res = _quantize(model, _x(), matmul_form="dynamic", **UNTIMED)
    stats = _smoothing_stats(res)
    assert [e["how"] for e in stats["smoothing"]] == ["added Mul"], stats["smoothing"]
    off = _quantize(model, _x(), matmul_form="dynamic", smooth="off", **UNTIMED)
    assert _ops(res.model)["Mul"] == _ops(off.model)["Mul"] + 1  # the added division
    assert any(n.op_type == "Mul" and n.input[0] == "h" for n in res.model.graph.node)
    assert _sqnr(model, res.model, _x(1)[0]) > _sqnr(model, off.model, _x(1)[0])


def test_layer_input_without_outlier_channels_is_left_alone_with_a_note():
    res = _quantize(_scaled(outliers=False), _x(), matmul_form="dynamic", **UNTIMED)
    stats = _smoothing_stats(res)
    assert stats["smoothed_layernorms"] == 0
    assert not any(n.op_type == "Mul" and n.input[0] == "h" for n in res.model.graph.node)
    assert any("without outlier channels" in note for note in stats["notes"]), stats["notes"]
