"""`fuse` on models built to break it: rank-changing biases, unknown ranks, opset-7 BatchNorm with
spatial=0, and control flow (If/Loop bodies, outer-scope references). Every result must pass the full
checker, keep the output shapes, and compute what the original computes."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ops, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxopt

RNG = np.random.default_rng(7)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _bn_inits(c, shape=None):
    shape = shape or (c,)
    return [
        _init("s", RNG.uniform(0.5, 2, shape)),
        _init("b", RNG.standard_normal(shape)),
        _init("m", RNG.standard_normal(shape)),
        _init("v", RNG.uniform(0.1, 2, shape)),
    ]


def _model(nodes, inits, inputs, outputs, opset=15):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _fuse(m):
    res = onnxopt.optimize(m, pipeline="fuse")
    onnx.checker.check_model(res.model, full_check=True)
    return res


def _same(m, out, feeds):
    want, got = run_model(m, feeds), run_model(out, feeds)
    assert [w.shape for w in want] == [g.shape for g in got]
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_matmul_with_size_one_bias_of_rank_three_is_not_a_gemm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 5])
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        [_init("w", RNG.standard_normal((4, 5))), _init("b", [[[0.5]]])],
        [x],
        [y],
    )
    out = _fuse(m).model
    assert "Gemm" not in ops(out)
    _same(m, out, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})


def test_matmul_with_size_one_bias_of_rank_two_still_becomes_gemm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        [_init("w", RNG.standard_normal((4, 5))), _init("b", [[0.5]])],
        [x],
        [y],
    )
    out = _fuse(m).model
    assert ops(out) == ["Gemm"]
    _same(m, out, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})


def _unknown_rank_bn_model(k):
    """Reshape(d, runtime shape) -> BatchNormalization -> Mul(k) -> Flatten: the BN's rank is unknowable."""
    c = 3
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n"])
    sh = helper.make_tensor_value_info("sh", TensorProto.INT64, ["r"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])
    return _model(
        [
            helper.make_node("Reshape", ["d", "sh"], ["x"]),
            helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Mul", ["n", "k"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        [*_bn_inits(c), _init("k", k)],
        [d, sh],
        [y],
    )


def test_mul_after_batchnorm_of_unknown_rank_is_not_folded_as_if_rank_four():
    m = _unknown_rank_bn_model(RNG.uniform(0.5, 2, (1, 3, 1, 1)))
    out = _fuse(m).model
    assert ops(out) == ["Reshape", "BatchNormalization", "Mul", "Flatten"]
    # rank 3 at run time: the Mul broadcasts to rank 4, which folding it into the BN would lose
    _same(m, out, {"d": RNG.standard_normal(15).astype(np.float32), "sh": np.array([1, 3, 5], np.int64)})


def test_scalar_mul_after_batchnorm_of_unknown_rank_is_folded():
    m = _unknown_rank_bn_model([1.5])
    out = _fuse(m).model
    assert ops(out) == ["Reshape", "BatchNormalization", "Flatten"]
    _same(m, out, {"d": RNG.standard_normal(30).astype(np.float32), "sh": np.array([2, 3, 5], np.int64)})


def test_opset7_batchnorm_with_spatial_0_is_left_alone_with_a_reason():
    c, hw = 4, (3, 3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, *hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, *hw])
    m = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["t"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["y"], spatial=0),
        ],
        [_init("w", RNG.standard_normal((c, 2, 3, 3))), *_bn_inits(c, (c, *hw))],
        [x],
        [y],
        opset=7,
    )
    res = _fuse(m)
    assert ops(res.model) == ["Conv", "BatchNormalization"] and not res.report["passes"][0]["changed"]
    assert any("spatial=0" in s["reason"] for s in res.report["passes"][0]["skipped"])
    _same(m, res.model, {"x": RNG.standard_normal((1, 2, *hw)).astype(np.float32)})


def _branch(name, nodes, out, shape, inits=()):
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], list(inits)
    )


def test_conv_batchnorm_inside_if_branch_is_fused_reading_outer_weights():
    c = 4
    shape = [1, c, 5, 5]
    then = _branch(
        "then",
        [
            helper.make_node("Conv", ["x", "w"], ["tc"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["tc", "s", "b", "m", "v"], ["tn"]),
            helper.make_node("Relu", ["tn"], ["ty"]),
        ],
        "ty",
        shape,
    )
    other = _branch("else", [helper.make_node("Neg", ["x"], ["ey"])], "ey", shape)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    m = _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [_init("w", RNG.standard_normal((c, c, 3, 3))), *_bn_inits(c)],
        [x, cond],
        [y],
    )
    res = _fuse(m)
    stats = res.report["passes"][0]["stats"]
    assert stats["batchnorm_folded"] == 1 and stats["in_subgraphs"] == 1
    branch = next(a.g for a in res.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Conv", "Relu"]
    xv = RNG.standard_normal(shape).astype(np.float32)
    for flag in (True, False):
        _same(m, res.model, {"x": xv, "cond": np.array(flag)})


def test_outer_conv_read_by_a_branch_mul_is_not_fused_across_the_scope():
    c = 4
    shape = [1, c, 5, 5]
    then = _branch("then", [helper.make_node("Mul", ["oc", "k"], ["ty"])], "ty", shape)
    other = _branch("else", [helper.make_node("Neg", ["x"], ["ey"])], "ey", shape)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    m = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["oc"], pads=[1, 1, 1, 1]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
        ],
        [_init("w", RNG.standard_normal((c, c, 3, 3))), _init("k", RNG.standard_normal((c, 1, 1)))],
        [x, cond],
        [y],
    )
    res = _fuse(m)
    assert not res.report["passes"][0]["changed"]
    branch = next(a.g for a in res.model.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Mul"]
    xv = RNG.standard_normal(shape).astype(np.float32)
    for flag in (True, False):
        _same(m, res.model, {"x": xv, "cond": np.array(flag)})


def test_mul_chain_inside_loop_body_is_merged():
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["acc", "a"], ["t"]),
            helper.make_node("Mul", ["t", "b"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3]),
        ],
        [_init("a", RNG.uniform(0.5, 1.5, (3,))), _init("b", RNG.uniform(0.5, 1.5, (3,)))],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    m = _model(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        [numpy_helper.from_array(np.array(3, np.int64), "n")],
        [x],
        [y],
    )
    res = _fuse(m)
    assert res.report["passes"][0]["stats"]["chains_merged"] == 1
    loop_body = res.model.graph.node[0].attribute[0].g
    assert [n.op_type for n in loop_body.node].count("Mul") == 1
    _same(m, res.model, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})
