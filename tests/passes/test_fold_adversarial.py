"""`fold` on inputs it was never tuned for: integer semantics, control flow, odd dtypes and constants,
overridable initializers, odd options. Each test is a small model with the structure of a defect found
on real models (issue #14); each checks validity and values against onnxruntime on the original."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import ops, parse, run_model
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.cli import main as cli_main
from onnxopt.framework.context import PassContext
from onnxopt.ir.graph import export_model, import_model
from onnxopt.passes.fold.folding import FoldConstants


def fold(model: onnx.ModelProto, pipeline: str = "fold") -> onnx.ModelProto:
    out = onnxopt.optimize(model, pipeline=pipeline).model
    onnx.checker.check_model(out, full_check=True)
    return out


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(run_model(a, feeds), run_model(b, feeds)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# --- integer arithmetic: ONNX semantics, not Python's -------------------------------------------


def test_uint8_constant_arithmetic_wraps_and_keeps_its_dtype():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (uint8[2] z) => (uint8[2] y) {
        a = Constant <value = uint8[2] {200, 100}> ()
        b = Constant <value = uint8[2] {100, 200}> ()
        t = Add (a, b)
        y = Add (t, z)
    }""")
    out = fold(m)
    assert ops(out) == ["Add"]
    (t,) = [numpy_helper.to_array(i) for i in out.graph.initializer]
    assert t.dtype == np.uint8 and t.tolist() == [44, 44]  # 300 mod 256
    same_outputs(m, out, {"z": np.array([1, 2], np.uint8)})


def test_int32_shape_arithmetic_stays_int32_and_wraps():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[70000, 3] x, int32[2] z) => (int32[2] y) {
        s = Shape (x)
        c = Cast <to = 6> (s)
        t = Mul (c, c)
        y = Add (t, z)
    }""")
    out = fold(m)
    assert ops(out) == ["Add"]
    (t,) = [numpy_helper.to_array(i) for i in out.graph.initializer]
    assert t.dtype == np.int32 and t.tolist() == [(70000 * 70000 + 2**31) % 2**32 - 2**31, 9]  # 4.9e9 wraps
    same_outputs(m, out, {"x": np.zeros((70000, 3), np.float32), "z": np.zeros(2, np.int32)})


@pytest.mark.parametrize("source", ["shape", "initializer"])
def test_negative_integer_division_truncates_and_mod_follows_fmod(source):
    a = "a = Shape <end = 1> (x)" if source == "shape" else "a = Constant <value = int64[1] {7}> ()"
    m = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[7, 3] x, int64[3] z) => (int64[3] y) {{
        {a}
        m = Constant <value = int64[1] {{-2}}> ()
        na = Neg (a)
        q = Div (a, m)
        r0 = Mod <fmod = 0> (na, m)
        r1 = Mod <fmod = 1> (na, m)
        t = Concat <axis = 0> (q, r0, r1)
        y = Add (t, z)
    }}""")
    out = fold(m)
    assert ops(out) == ["Add"]
    (t,) = [numpy_helper.to_array(i) for i in out.graph.initializer]
    assert t.tolist() == [-3, -1, -1]  # 7 / -2 truncates; -7 mod -2 = -1 either way
    same_outputs(m, out, {"x": np.zeros((7, 3), np.float32), "z": np.zeros(3, np.int64)})


def test_int64_shape_overflow_wraps_instead_of_raising():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[7, 3] x, int64[1] z) => (int64[1] y) {
        s = Shape <end = 1> (x)
        big = Constant <value = int64[1] {9223372036854775807}> ()
        t = Mul (s, big)
        y = Add (t, z)
    }""")
    out = fold(m)
    assert ops(out) == ["Add"]
    same_outputs(m, out, {"x": np.zeros((7, 3), np.float32), "z": np.zeros(1, np.int64)})


def test_integer_division_that_traps_in_the_runtime_is_left_alone():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int32[1] z) => (int32[1] y) {
        a = Constant <value = int32[1] {-2147483648}> ()
        b = Constant <value = int32[1] {-1}> ()
        zero = Constant <value = int32[1] {0}> ()
        t = Div (a, b)
        u = Div (b, zero)
        v = Add (t, u)
        y = Add (v, z)
    }""")
    result = onnxopt.optimize(m, pipeline="fold")  # evaluating either Div would kill the process (SIGFPE)
    assert ops(result.model).count("Div") == 2
    skipped = [s for r in result.report["passes"] for s in r["skipped"]]
    assert sum("division" in s["reason"] for s in skipped) == 2


# --- If: inlining renames, never copies weights ------------------------------------------------


def _if_model(cond: bool, weight: np.ndarray | None = None) -> onnx.ModelProto:
    """Two Ifs whose branches use the same node and tensor names as the main graph and each other."""

    def branch(name: str, op: str) -> onnx.GraphProto:
        nodes = [helper.make_node(op, ["x", "W"], ["t"], name="n"), helper.make_node("Relu", ["t"], ["r"], name="n2")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("r", TP.FLOAT, None)])

    w = weight if weight is not None else np.full((4, 4), 0.5, np.float32)
    nodes = [
        helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.array(cond))),
        helper.make_node(
            "If", ["c"], ["y1"], name="if1", then_branch=branch("a", "MatMul"), else_branch=branch("b", "Add")
        ),
        helper.make_node(
            "If", ["c"], ["y2"], name="if2", then_branch=branch("c2", "Add"), else_branch=branch("d", "Mul")
        ),
        helper.make_node("Add", ["y1", "y2"], ["y"], name="n"),
    ]
    n = w.shape[0]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [n, n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cond", [True, False])
def test_inlined_if_nodes_and_tensors_get_unique_names(cond):
    m = _if_model(cond)
    out = fold(m)
    names = [n.name for n in out.graph.node]
    assert "If" not in ops(out) and len(names) == len(set(names))
    same_outputs(m, out, {"x": np.arange(16, dtype=np.float32).reshape(4, 4)})


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    stack = [model.graph]
    while stack:
        g = stack.pop()
        total += sum(len(i.raw_data) for i in g.initializer)
        stack.extend(a.g for n in g.node for a in n.attribute if a.HasField("g"))
    return total


@pytest.mark.parametrize("pipeline", ["fold", "fold,fuse"])
def test_outer_weight_shared_by_if_branches_is_stored_once(pipeline, tmp_path):
    """A weight both branches read from the enclosing scope stays one outer initializer (the LSTM-in-If
    model grew from 2.3 to 3.3 MB when each branch got its own copy)."""
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    m = _if_model(True, w)
    m.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(True)))
    cond = helper.make_tensor_value_info("c_in", TP.BOOL, [])
    m.graph.input.insert(0, cond)  # a runtime condition: the Ifs stay, their branches share W
    for node in m.graph.node:
        if node.op_type == "If":
            node.input[0] = "c_in"
    del m.graph.node[0]
    onnx.checker.check_model(m, full_check=True)
    out = fold(m, pipeline)
    assert _weight_bytes(out) == _weight_bytes(m) == w.nbytes
    # the CLI path writes into the source proto: the same holds there
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    assert cli_main(["optimize", str(src), "-o", str(dst), "-p", pipeline, "--quiet"]) == 0
    written = onnx.load(dst)
    assert _weight_bytes(written) == w.nbytes
    assert dst.stat().st_size <= src.stat().st_size + 200  # at most the provenance metadata
    feeds = {"c_in": np.array(False), "x": np.ones((128, 128), np.float32)}
    same_outputs(m, written, feeds)
    same_outputs(m, written, {**feeds, "c_in": np.array(True)})


def test_round_trip_keeps_a_weight_used_in_main_graph_and_body_once():
    m = _if_model(True)
    m.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(True)))
    m.graph.node.insert(1, helper.make_node("Mul", ["x", "W"], ["xw"], name="mw"))
    m.graph.node[-1].input[1] = "xw"
    m.graph.node.append(helper.make_node("Add", ["y2", "y2"], ["unused"], name="u"))
    out = export_model(import_model(m))
    assert _weight_bytes(out) == _weight_bytes(m)
    onnx.checker.check_model(out, full_check=True)


# --- constants gs or numpy cannot hold as they are ---------------------------------------------


def test_sparse_constant_is_kept_intact():
    sp = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0], np.float32), "v"),
        numpy_helper.from_array(np.array([1], np.int64), "i"),
        [3],
    )
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], sparse_value=sp), helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = fold(m)
    const = next(n for n in out.graph.node if n.op_type == "Constant")
    assert const.attribute[0].name == "sparse_value" and const.attribute[0].sparse_tensor == sp
    same_outputs(m, out, {"x": np.array([1, 2, 3], np.float32)})


def test_string_constants_fold_exactly():
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value_strings=["a", "bé"]),
            helper.make_node("Constant", [], ["d"], value_string="q"),
            helper.make_node("Constant", [], ["e"], value=helper.make_tensor("e", TP.STRING, [1], [b"r"])),
            helper.make_node("Unsqueeze", ["d", "ax"], ["d1"]),
            helper.make_node("Concat", ["c", "d1", "e"], ["k"], axis=0),
            helper.make_node("Concat", ["x", "k"], ["y"], axis=0),
        ],
        "g",
        [helper.make_tensor_value_info("x", TP.STRING, [1])],
        [helper.make_tensor_value_info("y", TP.STRING, [5])],
        [numpy_helper.from_array(np.array([0], np.int64), "ax")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = fold(m)
    assert ops(out) == ["Concat"]
    (y,) = run_model(out, {"x": np.array(["x"], object)})
    assert y.tolist() == ["x", "a", "bé", "q", "r"]


EXOTIC = [TP.BFLOAT16, TP.FLOAT8E4M3FN, TP.FLOAT8E5M2, TP.INT4, TP.UINT4]


@pytest.mark.parametrize("as_node", [True, False], ids=["constant_node", "initializer"])
@pytest.mark.parametrize("elem", EXOTIC, ids=[TP.DataType.Name(t) for t in EXOTIC])
def test_types_numpy_cannot_hold_are_kept_exactly(elem, as_node):
    t = helper.make_tensor("c", elem, [4], [1, 2, 3, 4])
    nodes = [
        helper.make_node("Cast", ["c"], ["cf"], to=TP.FLOAT),
        helper.make_node("Add", ["x", "cf"], ["y"]),
        helper.make_node("Cast", ["x"], ["xb"], to=elem),
        helper.make_node("Cast", ["xb"], ["y2"], to=TP.FLOAT),
    ]
    if as_node:
        nodes.insert(0, helper.make_node("Constant", [], ["c"], value=t))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [4]), helper.make_tensor_value_info("y2", TP.FLOAT, [4])],
        [] if as_node else [t],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(m, full_check=True)
    out = fold(m, "fold,fuse")
    (c,) = out.graph.initializer
    assert c.data_type == elem  # not widened: the compact storage stays
    same_outputs(m, out, {"x": np.array([0.5, -1, 2, 3], np.float32)})


# --- overridable initializers -------------------------------------------------------------------


def test_overridable_initializer_stays_an_input_with_its_default(tmp_path):
    b = numpy_helper.from_array(np.full(3, 2, np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Mul", ["B", "B"], ["b2"]), helper.make_node("Add", ["x", "b2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("B", TP.FLOAT, [3]), helper.make_tensor_value_info("x", TP.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [3])],
        [b],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = onnxopt.optimize(m, pipeline="fold,fuse")
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["B", "x"]
    assert [i.name for i in out.graph.initializer] == ["B"]
    assert ops(out) == ["Mul", "Add"]
    skipped = [s for r in result.report["passes"] for s in r["skipped"]]
    assert any(s["node"] == "B" and "overridable" in s["reason"] for s in skipped)
    x = np.array([1, 2, 3], np.float32)
    same_outputs(m, out, {"x": x})
    same_outputs(m, out, {"x": x, "B": np.array([3, 4, 5], np.float32)})  # the override still works
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"  # and through the CLI's in-place export
    onnx.save(m, src)
    assert cli_main(["optimize", str(src), "-o", str(dst), "--quiet"]) == 0
    written = onnx.load(dst)
    assert [i.name for i in written.graph.input] == ["B", "x"] and [i.name for i in written.graph.initializer] == ["B"]


# --- control flow bodies ------------------------------------------------------------------------


def test_loop_carried_value_is_not_folded_but_outer_constants_inside_the_body_are():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        n = Constant <value = int64 {3}> ()
        c = Constant <value = bool {1}> ()
        k = Constant <value = float[2] {1, 2}> ()
        y = Loop (n, c, x) <body = body (int64 i, bool cin, float[2] acc) => (bool cout, float[2] acc2) {
            cout = Identity (cin)
            two = Constant <value = float[2] {2, 2}> ()
            k2 = Mul (k, two)
            ki = Cast <to = 1> (i)
            step = Add (k2, ki)
            acc2 = Add (acc, step)
        }>
    }""")
    out = fold(m)
    body = next(n for n in out.graph.node if n.op_type == "Loop").attribute[0].g
    assert "Mul" not in [n.op_type for n in body.node]  # k * 2 folded inside the body
    assert [n.op_type for n in body.node].count("Add") == 2  # what depends on i / acc stays
    same_outputs(m, out, {"x": np.array([0.5, -1], np.float32)})


def test_scan_state_is_not_treated_as_a_constant():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 2] xs) => (float[2] s, float[3, 2] ys) {
        init = Constant <value = float[2] {0, 0}> ()
        s, ys = Scan <num_scan_inputs = 1, body = body (float[2] st, float[2] x) => (float[2] st2, float[2] y) {
            one = Constant <value = float[2] {1, 1}> ()
            st2 = Add (st, x)
            y = Add (st2, one)
        }> (init, xs)
    }""")
    out = fold(m)
    same_outputs(m, out, {"xs": np.arange(6, dtype=np.float32).reshape(3, 2)})


# --- options and signature details ---------------------------------------------------------------


@pytest.mark.parametrize("size", [math.inf, math.nan, -1.0, 0.0])
def test_odd_size_limits_do_not_crash(size):
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
        s = Constant <value = int64[1] {4}> ()
        c = ConstantOfShape <value = float[1] {1}> (s)
        y = Add (x, c)
    }""")
    graph = import_model(m)
    p = FoldConstants()
    p.options.size_limit_mb = size  # set after construction: range checks are the parser's business
    p.run(graph, PassContext())
    out = export_model(graph)
    onnx.checker.check_model(out, full_check=True)
    assert ("ConstantOfShape" in ops(out)) == (size != size or size < 0)  # NaN/negative keep generators
    same_outputs(m, out, {"x": np.arange(4, dtype=np.float32)})


def test_fold_keeps_output_shapes_and_doc_strings():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, seqlen] x) => (float[1, seqlen] y) {
        a = Constant <value = float[1] {2}> ()
        b = Constant <value = float[1] {3}> ()
        ab = Mul (a, b)
        t = Add (x, ab)
        y = Identity (t)
    }""")
    m.graph.node[3].doc_string = "adds the bias"
    m.graph.doc_string = "graph doc"
    m.graph.value_info.append(helper.make_tensor_value_info("y", TP.FLOAT, None))  # listed without a shape
    out = fold(m)
    assert ops(out) == ["Add"] and out.graph.node[0].doc_string == "adds the bias"
    assert out.graph.doc_string == "graph doc"
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, "seqlen"]


def test_bytes_added_by_folding_a_generator_are_reported():
    """`fold` may make the file larger only by materializing a generator under `size_limit_mb`; it says how much."""
    ones = ", ".join(["1"] * 100)
    m = parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1000, 100] x) => (float[1000, 100] y) {{
        w = Constant <value = float[1, 100] {{{ones}}}> ()
        s = Constant <value = int64[2] {{1000, 1}}> ()
        t = Tile (w, s)
        y = Add (x, t)
    }}""")
    result = onnxopt.optimize(m, pipeline="fold")
    assert ops(result.model) == ["Add"]
    added = result.report["passes"][0]["stats"]["constant_bytes_added"]
    assert added == 1000 * 100 * 4 - 100 * 4 - 2 * 8
    plain = onnxopt.optimize(
        parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        a = Constant <value = float[2] {1, 2}> ()
        b = Mul (a, a)
        y = Add (x, b)
    }"""),
        pipeline="fold",
    )
    assert "constant_bytes_added" not in plain.report["passes"][0]["stats"]


def test_shape_of_an_overridable_initializer_with_a_dynamic_declared_shape_is_not_folded():
    b = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    nodes = [
        helper.make_node("Shape", ["B"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TP.FLOAT),
        helper.make_node("Add", ["x", "sf"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [1]), helper.make_tensor_value_info("B", TP.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1])],
        [b],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = fold(m)
    assert "Shape" in ops(out)  # B may be fed with another length
    x = np.array([1], np.float32)
    same_outputs(m, out, {"x": x, "B": np.zeros(5, np.float32)})


def test_inference_keeps_the_declared_shape_of_an_overridable_initializer():
    from onnxopt.analysis.shapes import infer_tensor_info

    b = numpy_helper.from_array(np.zeros(3, np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Relu", ["B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("B", TP.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["n"])],
        [b],
    )
    info = infer_tensor_info(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert info["B"].shape == ("n",)


def test_folding_a_shared_weight_in_each_branch_does_not_copy_it(tmp_path):
    """Both branches of an If reshape the same outer weight (Unsqueeze(W)); folding each Unsqueeze would
    store W twice more (the structure of an LSTM-in-If voice-activity model, whose file grew by 1 MB)."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    def branch(name: str) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Constant", [], ["ax"], value=numpy_helper.from_array(np.array([0], np.int64))),
            helper.make_node("Unsqueeze", ["W", "ax"], ["u"]),
            helper.make_node("Add", ["x", "u"], ["r"]),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("r", TP.FLOAT, None)])

    nodes = [helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("a"), else_branch=branch("b"))]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("c", TP.BOOL, []), helper.make_tensor_value_info("x", TP.FLOAT, [1, 64, 64])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [1, 64, 64])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    assert cli_main(["optimize", str(src), "-o", str(dst), "-p", "fold,fuse", "--quiet"]) == 0
    assert dst.stat().st_size <= src.stat().st_size + 200  # at most the provenance metadata
    x = np.random.default_rng(1).standard_normal((1, 64, 64)).astype(np.float32)
    for c in (True, False):
        same_outputs(m, onnx.load(dst), {"c": np.array(c), "x": x})


def test_slices_of_one_weight_that_all_fold_are_folded():
    """Every reader of the weight folds (the gate chunks of an LSTM weight sliced apart): the weight goes,
    nothing is copied, so the shared-constant rule must not stop it."""
    w = np.random.default_rng(0).standard_normal((8, 64, 16)).astype(np.float32)
    m = parse(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 32] x) => (float[4, 16] y) <float[8, 64, 16] W = {%s}> {
        s0 = Constant <value = int64[1] {0}> ()
        s4 = Constant <value = int64[1] {4}> ()
        s8 = Constant <value = int64[1] {8}> ()
        a = Slice (W, s0, s4, s0)
        b = Slice (W, s4, s8, s0)
        ra = ReduceSum <keepdims = 0> (a, s0)
        rb = ReduceSum <keepdims = 0> (b, s0)
        t = Sub (ra, rb)
        s32 = Constant <value = int64[1] {32}> ()
        top = Slice (t, s0, s32, s0)
        y = MatMul (x, top)
    }"""  # noqa: UP031  %-format: the ONNX text is full of braces
        % ",".join(f"{v:.6g}" for v in w.reshape(-1))
    )
    out = fold(m)
    assert ops(out) == ["MatMul"]
    assert _weight_bytes(out) < w.nbytes
    same_outputs(m, out, {"x": np.ones((4, 32), np.float32)})


def test_a_body_reading_a_static_dim_of_an_outer_input_folds_its_if():
    """Inside an If branch, a second If's condition is a static dim of a graph input (state[0] == 2 layers,
    as a voice-activity model tests it): the shape folds in the body and the inner If is inlined."""
    m = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[2, N, 4] state, float[N, 4] x) => (float[N, 4] y) {
        y = If (c) <then_branch = t () => (float[N, 4] ty) {
            s = Shape (state)
            i0 = Constant <value = int64 {0}> ()
            d = Gather (s, i0)
            inner = Cast <to = 9> (d)
            ty = If (inner) <then_branch = a () => (float[N, 4] ay) { ay = Relu (x) },
                             else_branch = b () => (float[N, 4] by) { by = Neg (x) }>
        }, else_branch = e () => (float[N, 4] ey) { ey = Identity (x) }>
    }""")
    out = fold(m)
    bodies = [a.g for n in out.graph.node for a in n.attribute if a.HasField("g")]
    assert not [n for b in bodies for n in b.node if n.op_type == "If"]
    rng = np.random.default_rng(0)
    for c in (True, False):
        same_outputs(
            m,
            out,
            {
                "c": np.array(c),
                "state": rng.standard_normal((2, 3, 4)).astype(np.float32),
                "x": rng.standard_normal((3, 4)).astype(np.float32),
            },
        )


def test_the_branch_not_taken_stops_reading_outer_weights():
    """Once a constant If is inlined, the dropped branch's nodes no longer count as readers of the outer
    weight, so what the taken branch computes from it folds (and the weight is not kept twice)."""
    w = np.random.default_rng(0).standard_normal((8, 32, 16)).astype(np.float32)

    def branch(name: str, start: int) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([start], np.int64))),
            helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.array([start + 4]))),
            helper.make_node("Slice", ["W", "s", "e"], ["part"]),
            helper.make_node("ReduceSum", ["part", "s0"], ["r"], keepdims=0),
            helper.make_node("Add", ["x", "r"], ["o"]),
        ]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("o", TP.FLOAT, None)])

    nodes = [
        helper.make_node("Constant", [], ["s0"], value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("a", 0), else_branch=branch("b", 4)),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TP.FLOAT, [32, 16])],
        [helper.make_tensor_value_info("y", TP.FLOAT, [32, 16])],
        [numpy_helper.from_array(w, "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = fold(m)
    assert ops(out) == ["Add"] and _weight_bytes(out) < w.nbytes
    same_outputs(m, out, {"x": np.ones((32, 16), np.float32)})
