"""The quantize pass on models shaped like the zoo's: layers inside If/Loop bodies, recurrent layers,
already-quantized models (onnxruntime's dynamic quantization), and models with nothing to quantize.

Each test builds a small model of the same structure; a no-op must always say why.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxopt
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.passes.quantize.optimized import optimized_op_types
from onnxopt.passes.quantize.proto_graphs import walk_graphs
from onnxopt.runtime.sessions import make_session


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))


def _if_lstm(hidden: int = 32, inputs: int = 16, seed: int = 0) -> onnx.ModelProto:
    """An If whose two branches each run an LSTM whose weights live in the outer graph (as in an audio
    model whose If on the sample rate selects one of two recurrent stacks)."""
    rng = np.random.default_rng(seed)

    def branch(tag: str) -> onnx.GraphProto:
        lstm = h.make_node(
            "LSTM", ["xt", f"W_{tag}", f"R_{tag}", f"B_{tag}"], ["Y", "Yh"], name=f"lstm_{tag}", hidden_size=hidden
        )
        sq = h.make_node("Squeeze", ["Yh", "ax0"], [f"out_{tag}"], name=f"sq_{tag}")
        return h.make_graph([lstm, sq], f"br_{tag}", [], [h.make_tensor_value_info(f"out_{tag}", T.FLOAT, [1, hidden])])

    nodes = [
        h.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="tr"),
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
        h.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        h.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch("a"), else_branch=branch("b")),
    ]
    inits = [nh.from_array(np.array([0], np.int64), "ax0"), nh.from_array(np.zeros((1,), np.float32), "zero")]
    for tag in "ab":
        inits += [
            nh.from_array((rng.standard_normal((1, 4 * hidden, inputs)) * 0.3).astype(np.float32), f"W_{tag}"),
            nh.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.2).astype(np.float32), f"R_{tag}"),
            nh.from_array((rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32), f"B_{tag}"),
        ]
    g = h.make_graph(
        nodes,
        "if_lstm",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 10, inputs])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, hidden])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _loop_matmul(n: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A Loop whose body applies tanh(v @ W_outer) @ W_local: one weight in the outer graph (outer-scope
    reference), one a Constant of the body."""
    rng = np.random.default_rng(seed)
    w_local = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    body = h.make_graph(
        [
            h.make_node("MatMul", ["v_in", "W_outer"], ["a"], name="body_mm_outer"),
            h.make_node("Tanh", ["a"], ["t"], name="body_tanh"),
            h.make_node("Constant", [], ["W_local"], name="body_const", value=nh.from_array(w_local, "W_local")),
            h.make_node("MatMul", ["t", "W_local"], ["v_out"], name="body_mm_local"),
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("v_in", T.FLOAT, [1, n]),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, [1, n])],
    )
    nodes = [h.make_node("Loop", ["trips", "", "x"], ["y"], name="looper", body=body)]
    inits = [
        nh.from_array(np.array(3, np.int64), "trips"),
        nh.from_array((rng.standard_normal((n, n)) * 1.5 / np.sqrt(n)).astype(np.float32), "W_outer"),
    ]
    g = h.make_graph(
        nodes,
        "loop_mm",
        [h.make_tensor_value_info("x", T.FLOAT, [1, n])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, n])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def _data(model: onnx.ModelProto, k: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    i = model.graph.input[0]
    shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
    return [{i.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(k)]


def _record(result, name: str = "quantize") -> dict:
    return next(p for p in result.report["passes"] if p["name"] == name)


def _sqnr(a: onnx.ModelProto, b: onnx.ModelProto, data) -> float:
    sa, sb = make_session(a), make_session(b)
    return min(sqnr_db(sa.run(None, d)[0], sb.run(None, d)[0]) for d in data)


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers of every graph of `model`, bodies included (where a weight is written depends on
    the exporter: in the outer graph or copied into each body that reads it)."""
    return {t.name: t for g, _, _ in walk_graphs(model.graph) for t in g.initializer}


def _stored_int8(model: onnx.ModelProto) -> list[str]:
    return [name for name, t in _initializers(model).items() if t.data_type == T.INT8]


def test_lstm_weights_inside_if_branches_get_int8_storage_reported_per_layer():
    model, data = _if_lstm(), _data(_if_lstm())
    res = onnxopt.optimize(model, pipeline="quantize", calibration=data)
    rec = _record(res)
    assert rec["changed"]
    rows = {d["node"]: d for d in rec["details"]}
    for tag in "ab":
        row = rows[f"lstm_{tag}"]
        assert row["weight_storage"] == "int8" and row["where"].startswith("If 'branchy'")
        assert "cannot be calibrated" in row["why"] and row["storage_sqnr_db"] > 30
    # outer-scope weights: stored as int8, no float copy left in any graph
    assert sorted(_stored_int8(res.model)) == ["R_a_wstore_q", "R_b_wstore_q", "W_a_wstore_q", "W_b_wstore_q"]
    assert not {"W_a", "R_a", "W_b", "R_b"} & set(_initializers(res.model))
    onnx.checker.check_model(res.model, full_check=True)
    # onnxruntime folds them back at load, bodies included: the same kernels run
    assert collections.Counter(optimized_op_types(res.model, subgraphs=True)) == collections.Counter(
        optimized_op_types(model, subgraphs=True)
    )
    assert _sqnr(model, res.model, data) > 30


def test_loop_body_matmuls_with_outer_and_local_weights_are_stored_int8():
    model = _loop_matmul()
    data = _data(model)
    res = onnxopt.optimize(model, pipeline="quantize", calibration=data)
    rec = _record(res)
    rows = {d["node"]: d for d in rec["details"]}
    assert rows["body_mm_outer"]["weight_storage"] == "int8" and rows["body_mm_local"]["weight_storage"] == "int8"
    assert "Loop 'looper' body" in rows["body_mm_local"]["where"]
    assert {"W_outer_wstore_q", "W_local_wstore_q"} <= set(_stored_int8(res.model))
    assert not {"W_outer", "W_local"} & set(_initializers(res.model))
    assert not any(n.op_type == "Constant" for g, _, _ in walk_graphs(res.model.graph) for n in g.node)
    onnx.checker.check_model(res.model, full_check=True)
    assert _sqnr(model, res.model, data) > 30
    assert rec["stats"]["output_sqnr_db"] > 30


def test_control_flow_layer_whose_weight_is_computed_is_left_alone_with_why():
    model = _loop_matmul()
    body = model.graph.node[0].attribute[0].g
    # W_local becomes computed in the body: Constant -> Neg -> MatMul
    const = next(n for n in body.node if n.op_type == "Constant")
    const.output[0] = "W_pos"
    body.node.insert(list(body.node).index(const) + 1, h.make_node("Neg", ["W_pos"], ["W_local"], name="neg"))
    res = onnxopt.optimize(model, pipeline="quantize", calibration=_data(model))
    rec = _record(res)
    left = {s["node"]: s["reason"] for s in rec["skipped"]}
    assert "computed, not a constant" in left["body_mm_local"]


def _dynamic_quantized(tmp_path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A float 3-MatMul model and its onnxruntime dynamic quantization (MatMulInteger with
    DynamicQuantizeLinear) with the last MatMul excluded (left float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[4, 64] x) => (float[4, 64] y) {
        a = MatMul (x, W1)
        r = Relu (a)
        b = MatMul (r, W2)
        t = Tanh (b)
        y = MatMul (t, W3)
    }
    """
    model = onnx.parser.parse_model(text)
    for name in ("W1", "W2", "W3"):
        model.graph.initializer.append(nh.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), name))
    for i, n in enumerate(model.graph.node):
        n.name = f"mm{i}" if n.op_type == "MatMul" else f"n{i}"
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, nodes_to_exclude=["mm4"])
    return model, onnx.load(dst)


def test_already_quantized_layers_are_reported_and_kept_exact(tmp_path):
    _, quantized = _dynamic_quantized(tmp_path)
    integer = {n.name: n for n in quantized.graph.node if n.op_type == "MatMulInteger"}
    assert len(integer) == 2
    data = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(6)]
    res = onnxopt.optimize(quantized, pipeline="fold,fuse,quantize", calibration=data)
    rec = _record(res)
    already = [d for d in rec["details"] if d.get("already_int8")]
    assert sorted(d["node"] for d in already) == sorted(integer)
    assert rec["stats"]["already_int8"] == 2
    kept = {n.name: n for n in res.model.graph.node if n.op_type == "MatMulInteger"}
    assert sorted(kept) == sorted(integer)
    inits = {t.name: nh.to_array(t) for t in res.model.graph.initializer}
    for t in quantized.graph.initializer:
        if t.data_type == T.INT8 and len(t.dims) == 2:  # the weights (fold may merge equal zero points)
            np.testing.assert_array_equal(inits[t.name], nh.to_array(t))
    # the float MatMul left by the dynamic quantizer is handled (quantized, stored, or said why)
    assert "mm4" in {d["node"] for d in rec["details"]} | {s["node"] for s in rec["skipped"]}
    # fold and fuse alone keep the integer layers exact
    folded = onnxopt.optimize(quantized, pipeline="fold,fuse").model
    a, b = make_session(quantized), make_session(folded)
    for d in data:
        np.testing.assert_array_equal(a.run(None, d)[0], b.run(None, d)[0])
    from onnxopt.report.tables import format_report

    assert "already int8 (2)" in format_report(res.report)


def test_nothing_quantizable_says_why():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 8, 16] q, float[1, 16, 8] k) => (float[1, 8, 8] y) {
        s = MatMul (q, k)
        y = Softmax <axis = -1> (s)
    }
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    data = [
        {
            "q": rng.standard_normal((1, 8, 16)).astype(np.float32),
            "k": rng.standard_normal((1, 16, 8)).astype(np.float32),
        }
        for _ in range(3)
    ]
    res = onnxopt.optimize(model, pipeline="quantize", calibration=data)
    rec = _record(res)
    assert not rec["changed"]
    assert rec["reason"].startswith("no quantizable layer in the main graph")
    assert "weight is not a constant" in rec["reason"]


def test_requantize_turns_dynamic_matmuls_back_to_float_and_quantizes_them(tmp_path):
    original, quantized = _dynamic_quantized(tmp_path)
    data = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(6)]
    res = onnxopt.optimize(quantized, pipeline="quantize{requantize=true,latency_aware=false}", calibration=data)
    rec = _record(res)
    assert rec["changed"] and rec["stats"]["requantized"] == 2 and rec["stats"]["already_int8"] == 0
    ops = collections.Counter(n.op_type for n in res.model.graph.node)
    assert ops["MatMulInteger"] == 0 and ops["DynamicQuantizeLinear"] == 0
    rows = {d["node"]: d for d in rec["details"]}
    assert {"mm0_quant_requantized", "mm2_quant_requantized"} <= set(rows)
    onnx.checker.check_model(res.model, full_check=True)
    # the dequantized layers compute what the integer ones approximated: close to the float model
    assert _sqnr(original, res.model, data) > 30


def test_requantize_says_why_an_integer_layer_stays():
    """A ConvInteger is not turned back to float: the skipped row says so."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[1, 4, 8, 8] x) => (int32[1, 8, 6, 6] y) {
        xq, xs, xz = DynamicQuantizeLinear (x)
        y = ConvInteger (xq, W, xz)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.node[1].name = "convint"
    model.graph.initializer.append(nh.from_array(np.ones((8, 4, 3, 3), np.uint8), "W"))
    data = [{"x": np.random.default_rng(s).standard_normal((1, 4, 8, 8)).astype(np.float32)} for s in range(2)]
    res = onnxopt.optimize(model, pipeline="quantize{requantize=true}", calibration=data)
    rec = _record(res)
    assert not rec["changed"] and "already int8: 1 layers (convint)" in rec["reason"]
    left = {s["node"]: s["reason"] for s in rec["skipped"]}
    assert left["convint"].startswith("not requantized: only MatMulInteger")
