"""The `fuse` pass: BatchNorm and per-channel affine ops folded into weights, MatMul+Add -> Gemm."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import ops, run_model
from onnx import TensorProto, helper, numpy_helper

import onnxopt

RNG = np.random.default_rng(0)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inits, x_shape, y_shape, opset=15):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _bn_inits(c):
    return [
        _init("s", RNG.uniform(0.5, 2, c)),
        _init("b", RNG.standard_normal(c)),
        _init("m", RNG.standard_normal(c)),
        _init("v", RNG.uniform(0.1, 2, c)),
    ]


def _same(m, out, shape, rtol=1e-4, atol=1e-5):
    x = RNG.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], run_model(m, {"x": x})[0], rtol=rtol, atol=atol)


def test_conv_batchnorm_mul_add_relu_becomes_conv_relu():
    c = 8
    m = _model(
        [
            helper.make_node("Conv", ["x", "w", "cb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
            helper.make_node("Mul", ["n", "k"], ["p"]),
            helper.make_node("Add", ["p", "a"], ["q"]),
            helper.make_node("Relu", ["q"], ["y"]),
        ],
        [
            _init("w", RNG.standard_normal((c, 4, 3, 3))),
            _init("cb", RNG.standard_normal(c)),
            *_bn_inits(c),
            _init("k", RNG.standard_normal((c, 1, 1))),
            _init("a", RNG.standard_normal((1, c, 1, 1))),
        ],
        [2, 4, 6, 6],
        [2, c, 6, 6],
    )
    res = onnxopt.optimize(m, pipeline="fuse")
    assert ops(res.model) == ["Conv", "Relu"]
    assert res.report["passes"][0]["stats"]["batchnorm_folded"] == 1
    _same(m, res.model, (2, 4, 6, 6))


def test_grouped_conv_transpose_batchnorm():
    cin, cout, g = 4, 6, 2
    m = _model(
        [
            helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=g, strides=[2, 2]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
        ],
        [_init("w", RNG.standard_normal((cin, cout // g, 2, 2))), *_bn_inits(cout)],
        [1, cin, 5, 5],
        [1, cout, 10, 10],
    )
    out = onnxopt.optimize(m, pipeline="fuse").model
    assert ops(out) == ["ConvTranspose"]
    _same(m, out, (1, cin, 5, 5))


def test_gemm_transb_alpha_beta_batchnorm():
    m = _model(
        [
            helper.make_node("Gemm", ["x", "w", "gb"], ["c"], transB=1, alpha=0.5, beta=2.0),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
        ],
        [_init("w", RNG.standard_normal((5, 3))), _init("gb", RNG.standard_normal(5)), *_bn_inits(5)],
        [4, 3],
        [4, 5],
    )
    out = onnxopt.optimize(m, pipeline="fuse").model
    assert ops(out) == ["Gemm"]
    _same(m, out, (4, 3))


def test_matmul_add_becomes_gemm_only_for_2d_input():
    m2 = _model(
        [helper.make_node("MatMul", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"])],
        [_init("w", RNG.standard_normal((3, 5))), _init("b", RNG.standard_normal(5))],
        [4, 3],
        [4, 5],
    )
    out = onnxopt.optimize(m2, pipeline="fuse").model
    assert ops(out) == ["Gemm"]
    _same(m2, out, (4, 3))
    m3 = _model(
        [helper.make_node("MatMul", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"])],
        [_init("w", RNG.standard_normal((3, 5))), _init("b", RNG.standard_normal(5))],
        [2, 4, 3],
        [2, 4, 5],
    )
    assert ops(onnxopt.optimize(m3, pipeline="fuse").model) == ["MatMul", "Add"]


def test_must_not_fire_when_conv_output_has_two_consumers_or_constant_is_not_per_channel():
    c = 4
    shared = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Add", ["n", "c"], ["y"]),
        ],
        [_init("w", RNG.standard_normal((c, 2, 1, 1))), *_bn_inits(c)],
        [1, 2, 3, 3],
        [1, c, 3, 3],
    )
    res = onnxopt.optimize(shared, pipeline="fuse")
    assert "BatchNormalization" in ops(res.model) and not res.report["passes"][0]["changed"]
    spatial = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])],
        [_init("w", RNG.standard_normal((c, 2, 1, 1))), _init("k", RNG.standard_normal((1, 1, 3, 3)))],
        [1, 2, 3, 3],
        [1, c, 3, 3],
    )
    assert ops(onnxopt.optimize(spatial, pipeline="fuse").model) == ["Conv", "Mul"]


def test_fused_output_keeps_the_graph_output_name():
    c = 3
    m = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"]),
        ],
        [_init("w", RNG.standard_normal((c, 2, 1, 1))), *_bn_inits(c)],
        [1, 2, 3, 3],
        [1, c, 3, 3],
    )
    out = onnxopt.optimize(m, pipeline="fuse").model
    assert ops(out) == ["Conv"] and out.graph.node[0].output[0] == "y"
