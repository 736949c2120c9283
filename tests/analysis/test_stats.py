"""Statistics and `inspect` over every graph of a model: nodes and MACs inside If/Loop/Scan bodies,
MACs of integer, quantized and recurrent ops, and signatures with sequence/optional values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.analysis.stats import model_stats
from onnxopt.cli import main

RNG = np.random.default_rng(3)
SEQ, BATCH, IN, HID = 5, 2, 3, 4
LSTM_MACS = SEQ * BATCH * 4 * HID * (IN + HID)  # 4 gates, input and recurrent products per step


def _f(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=imports)


def _if_with_lstm_model():
    """Main graph: one If; its then-branch holds an LSTM and a MatMul on outer weights, else an Identity."""
    then = helper.make_graph(
        [
            helper.make_node("LSTM", ["x", "W", "R"], ["", "h"], hidden_size=HID),
            helper.make_node("Reshape", ["h", "hs"], ["h2"]),
            helper.make_node("MatMul", ["h2", "P"], ["ty"]),
        ],
        "then",
        [],
        [_vi("ty", [BATCH, 6])],
        [numpy_helper.from_array(np.array([BATCH, HID], np.int64), "hs")],
    )
    other = helper.make_graph([helper.make_node("Identity", ["z"], ["ey"])], "else", [], [_vi("ey", [BATCH, 6])])
    m = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [_vi("x", [SEQ, BATCH, IN]), _vi("c", [], TensorProto.BOOL), _vi("z", [BATCH, 6])],
        [_vi("y", [BATCH, 6])],
        [_f("W", (1, 4 * HID, IN)), _f("R", (1, 4 * HID, HID)), _f("P", (HID, 6))],
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def test_nodes_and_macs_inside_if_branches_are_counted():
    s = model_stats(_if_with_lstm_model())
    assert (s.main_graph_nodes, s.nodes) == (1, 5)
    assert s.ops == {"Identity": 1, "If": 1, "LSTM": 1, "MatMul": 1, "Reshape": 1}
    assert s.macs == LSTM_MACS + BATCH * HID * 6 and s.macs_uncounted == 0
    assert s.parameters == 4 * HID * IN + 4 * HID * HID + HID * 6 + 2  # the branch's shape constant too


def test_optimize_report_counts_subgraph_nodes_before_and_after():
    res = onnxopt.optimize(_if_with_lstm_model(), pipeline="fuse")
    assert res.report["before"]["nodes"] == 5 and res.report["before"]["main_graph_nodes"] == 1
    assert res.report["passes"][0]["after"]["nodes"] == 5 and res.report["before"]["macs"] > LSTM_MACS


def test_if_counts_its_costlier_branch_and_loop_its_trip_count():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc", "w"], ["acc_out"]), helper.make_node("Identity", ["ci"], ["co"])],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("ci", [], TensorProto.BOOL), _vi("acc", [2, 8])],
        [_vi("co", [], TensorProto.BOOL), _vi("acc_out", [2, 8])],
    )
    per_iteration = 2 * 8 * 8
    trips = numpy_helper.from_array(np.array(7, np.int64), "n")
    m = _model(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        [_vi("x", [2, 8])],
        [_vi("y", [2, 8])],
        [trips, _f("w", (8, 8))],
    )
    s = model_stats(m)
    assert s.macs == 7 * per_iteration and s.loops_counted_once == 0 and s.nodes == 3
    dynamic = _model(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        [_vi("x", [2, 8]), _vi("n", [], TensorProto.INT64)],
        [_vi("y", [2, 8])],
        [_f("w", (8, 8))],
    )
    s = model_stats(dynamic)
    assert s.macs == per_iteration and s.loops_counted_once == 1


def test_scan_body_counts_once_per_scanned_element():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xi", "w"], ["yi"]), helper.make_node("Identity", ["s"], ["s2"])],
        "body",
        [_vi("s", [1]), _vi("xi", [1, 4])],
        [_vi("s2", [1]), _vi("yi", [1, 3])],
    )
    m = _model(
        [helper.make_node("Scan", ["s0", "xs"], ["sf", "ys"], body=body, num_scan_inputs=1)],
        [_vi("s0", [1]), _vi("xs", [6, 1, 4])],
        [_vi("sf", [1]), _vi("ys", [6, 1, 3])],
        [_f("w", (4, 3))],
    )
    assert model_stats(m).macs == 6 * 4 * 3


def _q(name, shape, dtype=np.int8):
    return numpy_helper.from_array(RNG.integers(-100, 100, shape).astype(dtype), name)


def _s(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.array(value, dtype), name)


def test_integer_and_quantized_convolutions_and_matmuls_count_like_their_float_ops():
    x8 = _vi("x", [1, 4, 6, 6], TensorProto.UINT8)
    a8 = _vi("a", [3, 5], TensorProto.UINT8)
    conv_macs = 1 * 8 * 6 * 6 * (4 * 3 * 3)
    m = _model(
        [
            helper.make_node("ConvInteger", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["q"], pads=[1, 1, 1, 1]),
            helper.make_node("MatMulInteger", ["a", "b"], ["mi"]),
            helper.make_node("QLinearMatMul", ["a", "xs", "xz", "b", "ws", "wz", "ys", "yz"], ["qm"]),
        ],
        [x8, a8],
        [
            _vi("c", [1, 8, 6, 6], TensorProto.INT32),
            _vi("q", [1, 8, 6, 6], TensorProto.UINT8),
            _vi("mi", [3, 2], TensorProto.INT32),
            _vi("qm", [3, 2], TensorProto.UINT8),
        ],
        [
            _q("w", (8, 4, 3, 3)),
            _q("b", (5, 2)),
            _s("xs", 0.1),
            _s("xz", 128, np.uint8),
            _s("ws", 0.02),
            _s("wz", 0, np.int8),
            _s("ys", 0.2),
            _s("yz", 128, np.uint8),
        ],
    )
    onnx.checker.check_model(m, full_check=True)
    s = model_stats(m)
    assert s.macs_by_node == {
        "ConvInteger_0": conv_macs,
        "QLinearConv_1": conv_macs,
        "MatMulInteger_2": 3 * 5 * 2,
        "QLinearMatMul_3": 3 * 5 * 2,
    }


def test_contrib_quantized_ops_count_through_the_models_named_dimensions():
    """What onnxruntime's dynamic quantizer writes (com.microsoft ops shape inference does not know):
    their declared output shapes use the input's dimension names, which the pinned input shapes bind."""
    nodes = [
        helper.make_node(
            "DynamicQuantizeLSTM",
            ["x", "W", "R", "", "", "", "", "", "ws", "wz", "rs", "rz"],
            ["h"],
            domain="com.microsoft",
            hidden_size=HID,
        ),
        helper.make_node("DynamicQuantizeMatMul", ["f", "B", "bs", "bz"], ["d"], domain="com.microsoft"),
        helper.make_node("MatMulIntegerToFloat", ["g", "B", "as", "bs"], ["e"], domain="com.microsoft"),
        helper.make_node("QGemm", ["g2", "as", "az", "B", "bs", "bz", "", "ys", "yz"], ["qg"], domain="com.microsoft"),
    ]
    m = _model(
        nodes,
        [
            _vi("x", ["seq", "batch", IN]),
            _vi("f", ["batch", 5]),
            _vi("g", ["batch", 5], TensorProto.UINT8),
            _vi("g2", ["batch", 5], TensorProto.UINT8),
        ],
        [
            _vi("h", ["seq", 1, "batch", HID]),
            _vi("d", ["batch", 2]),
            _vi("e", ["batch", 2]),
            _vi("qg", ["batch", 2], TensorProto.UINT8),
        ],
        [
            _q("W", (1, IN, 4 * HID)),
            _q("R", (1, HID, 4 * HID)),
            _q("B", (5, 2)),
            _s("ws", [0.1]),
            _s("wz", [0], np.int8),
            _s("rs", [0.1]),
            _s("rz", [0], np.int8),
            _s("bs", 0.1),
            _s("bz", 0, np.int8),
            _s("as", 0.1),
            _s("az", 0, np.uint8),
            _s("ys", 0.1),
            _s("yz", 0, np.uint8),
        ],
        domains=["com.microsoft"],
    )
    s = model_stats(m, {"x": (SEQ, BATCH, IN), "f": (BATCH, 5), "g": (BATCH, 5), "g2": (BATCH, 5)})
    assert s.macs_uncounted == 0
    assert s.macs == LSTM_MACS + 3 * BATCH * 5 * 2


def test_recurrent_ops_count_per_step_times_sequence_length():
    for op, gates in (("LSTM", 4), ("GRU", 3), ("RNN", 1)):
        m = _model(
            [helper.make_node(op, ["x", "W", "R"], ["y"], hidden_size=HID, direction="bidirectional")],
            [_vi("x", [SEQ, BATCH, IN])],
            [_vi("y", [SEQ, 2, BATCH, HID])],
            [_f("W", (2, gates * HID, IN)), _f("R", (2, gates * HID, HID))],
        )
        assert model_stats(m).macs == SEQ * BATCH * 2 * gates * HID * (IN + HID), op


@pytest.fixture
def sequence_model(tmp_path):
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3]))
    nodes = [
        helper.make_node("SequenceAt", ["s", "i"], ["a"]),
        helper.make_node("MatMul", ["a", "w"], ["y"]),
        helper.make_node("SequenceConstruct", ["a", "a"], ["sy"]),
        helper.make_node("Optional", ["a"], ["oy"]),
    ]
    m = _model(
        nodes,
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2, 3])],
        [
            _vi("y", [2, 4]),
            helper.make_tensor_sequence_value_info("sy", TensorProto.FLOAT, [2, 3]),
            helper.make_value_info("oy", opt),
        ],
        [numpy_helper.from_array(np.array(0, np.int64), "i"), _f("w", (3, 4))],
        opset=18,
    )
    onnx.checker.check_model(m, full_check=True)
    path = tmp_path / "seq.onnx"
    onnx.save(m, path)
    return path


def test_inspect_shows_sequence_and_optional_values(sequence_model, capsys):
    assert main(["inspect", str(sequence_model)]) == 0
    out = capsys.readouterr().out
    assert "input  s: sequence<float32 [2, 3]>" in out and "output oy: optional<float32 [2, 3]>" in out
    assert "24 MACs" in out
    assert main(["inspect", str(sequence_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"]["s"] == {"kind": "sequence", "dtype": "float32", "shape": [2, 3]}
    assert info["outputs"]["y"] == {"kind": "tensor", "dtype": "float32", "shape": [2, 4]}
    assert info["input_shapes"] == {}


def test_inspect_reports_main_graph_and_body_nodes(tmp_path, capsys):
    path = tmp_path / "if.onnx"
    onnx.save(_if_with_lstm_model(), path)
    assert main(["inspect", str(path)]) == 0
    assert "5 nodes (1 in the main graph, 4 in If/Loop/Scan bodies)" in capsys.readouterr().out


def test_dims_written_as_minus_one_never_give_negative_macs():
    """Some exporters write a dynamic axis as dim_value -1 (PP-OCR cls declares its output [-1, 2]);
    a product over it is unknown, not negative."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y], [w])
    g.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3]))
    st = model_stats(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert st.macs >= 0 and all(v >= 0 for v in st.macs_by_node.values())


def test_macs_are_counted_where_onnx_shape_inference_loses_a_pinned_dim():
    # regression: BERT-style exports slice their position table to the sequence length computed from
    # Shape(input_ids); onnx's inference makes that Slice's output dims symbolic even with the input
    # pinned, so every MatMul after it went uncounted (MiniLM reported 0 MACs)
    rng = np.random.default_rng(0)
    m = _model(
        [
            helper.make_node("Shape", ["ids"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["len"], axis=0),
            helper.make_node("Slice", ["table", "zero", "len", "one"], ["pos"]),
            helper.make_node("Gather", ["emb", "pos"], ["e"], axis=0),
            helper.make_node("MatMul", ["e", "w"], ["y"]),
        ],
        [_vi("ids", ["batch", "seq"], TensorProto.INT64)],
        [_vi("y", None)],
        [
            numpy_helper.from_array(np.arange(512, dtype=np.int64).reshape(1, 512), "table"),
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(rng.standard_normal((512, 8)).astype(np.float32), "emb"),
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
        ],
    )
    stats = model_stats(m, {"ids": (1, 64)})
    assert stats.macs_uncounted == 0
    assert stats.macs == 64 * 8 * 4


def test_a_second_opinion_on_shapes_leaves_no_file_behind(tmp_path, monkeypatch):
    # regression: onnxruntime's symbolic shape inference saves sym_shape_infer_temp.onnx (and its
    # data files) into the working directory when it cannot finish, e.g. on an unknown custom op
    monkeypatch.chdir(tmp_path)
    m = _model(
        [helper.make_node("Foo", ["x"], ["y"], domain="acme"), helper.make_node("MatMul", ["y", "w"], ["z"])],
        [_vi("x", ["n", 4])],
        [_vi("z", None)],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
        domains=("acme",),
    )
    model_stats(m, {"x": (1, 4)})
    assert list(tmp_path.iterdir()) == []
