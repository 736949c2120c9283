"""The `fold` pass: what must fold, what must not, and that outputs stay exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ops, parse, run_model

import onnxopt


def fold(model, pipeline="fold"):
    return onnxopt.optimize(model, pipeline=pipeline).model


def test_shape_with_start_folds_to_the_right_value():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N, 3, 8, 8] x) => (int64[3] s) {
        s0 = Shape <start = 1> (x)
        s = Add (s0, s0)
    }""")
    out = fold(m)
    assert "Shape" not in ops(out)
    (s,) = run_model(out, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    assert s.tolist() == [6, 16, 16]  # Shape(x)[1:] doubled; a folder ignoring `start` gives 4 entries


def test_dynamic_batch_reshape_becomes_minus_one():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N, 3, 8, 8] x) => (float[N, 192] y) {
        s = Shape (x)
        zero = Constant <value = int64[1] {0}> ()
        n = Gather <axis = 0> (s, zero)
        s1 = Shape <start = 1> (x)
        c = ReduceProd <keepdims = 1> (s1)
        shape = Concat <axis = 0> (n, c)
        y = Reshape (x, shape)
    }""")
    out = fold(m)
    assert ops(out) == ["Reshape"]
    shape = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer))
    assert shape.tolist() == [-1, 192]
    # dynamic axes are never frozen: the result runs at other batch sizes
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)
        (y,) = run_model(out, {"x": x})
        np.testing.assert_array_equal(y, x.reshape(n, 192))
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_dynamic_batch_reshape_becomes_minus_one_in_a_model_with_a_control_flow_body():
    # regression: with an If anywhere in the model, main-graph Reshape targets were looked up among
    # the shape values of the last body evaluated, so they kept their Shape/Gather/Concat chain
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[N, 3, 8, 8] x, bool c) => (float[N, 192] y, float[1] z) {
        s = Shape (x)
        zero = Constant <value = int64[1] {0}> ()
        n = Gather <axis = 0> (s, zero)
        s1 = Shape <start = 1> (x)
        p = ReduceProd <keepdims = 1> (s1)
        shape = Concat <axis = 0> (n, p)
        y = Reshape (x, shape)
        z = If (c) <
            then_branch = t () => (float[1] a) { a = Constant <value = float[1] {1.0}> () },
            else_branch = e () => (float[1] b) { b = Constant <value = float[1] {2.0}> () }
        >
    }""")
    out = fold(m)
    assert sorted(ops(out)) == ["If", "Reshape"]
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    target = next(i for i in out.graph.initializer if i.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [-1, 192]
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    y, z = run_model(out, {"x": x, "c": np.array(True)})
    np.testing.assert_array_equal(y, x.reshape(3, 192))
    assert z.tolist() == [1.0]


def test_constant_subgraph_is_evaluated_and_constant_nodes_become_initializers():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2, 3] x) => (float[2, 3] y) {
        a = Constant <value = float[3] {1, 2, 3}> ()
        b = Constant <value = float[3] {0.5, 0.5, 0.5}> ()
        c = Mul (a, b)
        d = Sqrt (c)
        y = Add (x, d)
    }""")
    out = fold(m)
    assert ops(out) == ["Add"]
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], x + np.sqrt([0.5, 1.0, 1.5]), rtol=1e-6)


def test_random_quantize_and_unknown_domain_ops_are_never_folded():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15, "com.example" : 1]>
    g (float[2] x) => (float[2] y, float[2] r, float[2] u) {
        s = Constant <value = float {0.1}> ()
        z = Constant <value = uint8 {0}> ()
        w = Constant <value = float[2] {1.0, 2.0}> ()
        q = QuantizeLinear (w, s, z)
        dq = DequantizeLinear (q, s, z)
        y = Add (x, dq)
        r0 = RandomNormal <shape = [2]> ()
        r = Add (x, r0)
        u0 = com.example.Custom (w)
        u = Add (x, u0)
    }""")
    out = fold(m)
    kinds = ops(out)
    assert kinds.count("QuantizeLinear") == 1 and kinds.count("DequantizeLinear") == 1
    assert "RandomNormal" in kinds and "Custom" in kinds


def test_int8_weight_storage_is_not_expanded_but_small_int8_casts_fold():
    """Cast(int8 weight) -> Mul(scale) is quantize's int8 storage: folding it would make the file 4x
    bigger again. A small int8 constant (under 1024 values) still folds."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.integers(-127, 128, (64, 32)).astype(np.int8), "wq")
    small = numpy_helper.from_array(rng.integers(-127, 128, (32,)).astype(np.int8), "bq")
    scale = numpy_helper.from_array(np.full((1, 32), 0.01, np.float32), "s")
    nodes = [
        helper.make_node("Cast", ["wq"], ["wf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["wf", "s"], ["w"]),
        helper.make_node("Cast", ["bq"], ["b"], to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [big, small, scale],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out = fold(m)
    assert ops(out).count("Cast") == 1 and "Mul" in ops(out)
    assert {i.name: i.data_type for i in out.graph.initializer}["wq"] == onnx.TensorProto.INT8
    x = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_model(out, x)[0], run_model(m, x)[0], rtol=1e-5, atol=1e-5)


def test_generator_above_size_limit_is_kept_and_reported_but_what_follows_still_folds():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[1, 1024, 1024] x) => (float[1, 1024, 1024] y, int64[3] s) {
        shape = Constant <value = int64[3] {1, 1024, 1024}> ()
        big = ConstantOfShape <value = float[1] {0.5}> (shape)
        y = Add (x, big)
        s0 = Shape (big)
        s = Add (s0, s0)
    }""")
    res = onnxopt.optimize(m, pipeline="fold{size_limit_mb=1}")
    out = res.model
    assert "ConstantOfShape" in ops(out)
    assert "Shape" not in ops(out)  # shape arithmetic on the kept generator still folds
    skipped = res.report["passes"][0]["skipped"]
    assert any(s["op"] == "ConstantOfShape" and "size_limit_mb" in s["reason"] for s in skipped)
    assert max(len(i.raw_data) for i in out.graph.initializer) < 2**20
    full = onnxopt.optimize(m, pipeline="fold{size_limit_mb=0}").model
    assert "ConstantOfShape" not in ops(full)


def test_identity_dropout_and_dead_nodes_go_but_output_names_stay():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[4] x) => (float[4] y) {
        a = Relu (x)
        b = Identity (a)
        c = Dropout (b)
        dead = Neg (x)
        y = Identity (c)
    }""")
    out = fold(m)
    assert ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    x = np.array([-1, 2, -3, 4], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], np.maximum(x, 0))


def test_identity_from_graph_input_to_output_is_kept():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[4] x) => (float[4] y) { y = Identity (x) }""")
    out = fold(m)
    assert ops(out) == ["Identity"]


def test_if_with_constant_condition_is_inlined():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2] x) => (float[2] y) {
        c = Constant <value = bool {1}> ()
        y = If (c) <
            then_branch = t () => (float[2] a) { a = Relu (x) },
            else_branch = e () => (float[2] b) { b = Neg (x) }
        >
    }""")
    out = fold(m)
    assert ops(out) == ["Relu"]
    x = np.array([-1, 2], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], [0, 2])


def test_folds_inside_loop_body_without_breaking_it():
    m = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    g (float[2] x) => (float[2] y) {
        n = Constant <value = int64 {3}> ()
        t = Constant <value = bool {1}> ()
        y = Loop (n, t, x) <body = body (int64 i, bool cin, float[2] acc) => (bool cout, float[2] nxt) {
            cout = Identity (cin)
            k = Constant <value = float[2] {1, 2}> ()
            k2 = Mul (k, k)
            nxt = Add (acc, k2)
        }>
    }""")
    out = fold(m)
    body = out.graph.node[0].attribute[0].g
    assert "Mul" not in [n.op_type for n in body.node]
    onnx.checker.check_model(out, full_check=True)
    x = np.array([0, 0], np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], [3, 12])


def test_long_out_of_order_chain_sorts_without_recursion_error():
    import onnx_graphsurgeon as gs

    from onnxopt.ir.graph import export_model, toposort

    x = gs.Variable("x", dtype=np.float32, shape=[1])
    nodes, cur = [], x
    for i in range(20000):
        nxt = gs.Variable(f"t{i}", dtype=np.float32, shape=[1])
        nodes.append(gs.Node("Relu", name=f"n{i}", inputs=[cur], outputs=[nxt]))
        cur = nxt
    g = gs.Graph(nodes=list(reversed(nodes)), inputs=[x], outputs=[cur], opset=15)
    toposort(g)
    assert [n.name for n in g.nodes[:3]] == ["n0", "n1", "n2"]
    export_model(g)


@pytest.mark.parametrize("size_limit", ["1", "0"])
def test_fold_is_idempotent_on_real_model(size_limit):
    from conftest import real_model

    path = real_model("squeezenet")
    once = onnxopt.optimize(path, pipeline=f"fold{{size_limit_mb={size_limit}}},fuse").model
    twice = onnxopt.optimize(once, pipeline=f"fold{{size_limit_mb={size_limit}}},fuse")
    assert not any(p["changed"] for p in twice.report["passes"])


def test_a_cycle_is_reported_with_the_nodes_on_it():
    import onnx_graphsurgeon as gs

    from onnxopt.ir.graph import toposort

    x = gs.Variable("x", dtype=np.float32, shape=[1])
    a, b, c = (gs.Variable(n, dtype=np.float32, shape=[1]) for n in "abc")
    nodes = [
        gs.Node("Add", name="first", inputs=[x, c], outputs=[a]),
        gs.Node("Relu", name="second", inputs=[a], outputs=[b]),
        gs.Node("Neg", name="third", inputs=[b], outputs=[c]),
    ]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[c], opset=15)
    with pytest.raises(ValueError, match="cycle: .*(first|second|third) -> .*(first|second|third)"):
        toposort(g)
