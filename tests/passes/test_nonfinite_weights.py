"""inf/NaN weights: prune, lowrank and quantize leave the layers they cannot handle alone and say why,
instead of failing inside an SVD or a Cholesky factorization (both raised on such models)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt


def _chain() -> onnx.ModelProto:
    """x -> MatMul(w1 with an inf and a NaN) -> Relu -> MatMul(w2) -> Relu -> MatMul(w3) -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 64)).astype(np.float32)
    w1[3, 5], w1[4, 6] = np.inf, np.nan
    ws = {
        "w1": w1,
        "w2": rng.standard_normal((64, 64)).astype(np.float32),
        "w3": rng.standard_normal((64, 32)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="m1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="m2"),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="m3"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w, k) for k, w in ws.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _calib() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(8)]


@pytest.mark.parametrize(
    "pipeline, expected",
    [
        ("fold,fuse,prune{macs=0.2}", {"m1": "holds inf/NaN", "m2": "read inf/NaN on the calibration data"}),
        (
            "fold,lowrank{params=0.3,timing=false}",
            {"m1": "weight holds inf/NaN", "m2": "input holds inf/NaN", "m3": "input holds inf/NaN"},
        ),
        (
            "fold,quantize{latency_aware=false,accuracy_aware=false,check_latency=false}",
            {"m1": "weight holds inf/NaN: kept float"},
        ),
    ],
)
def test_layers_with_inf_or_nan_are_left_alone_with_a_reason(pipeline, expected):
    result = onnxopt.optimize(_chain(), pipeline=pipeline, calibration=_calib())
    last = result.report["passes"][-1]
    reasons = {s["node"]: s["reason"] for s in last["skipped"]}
    for node, words in expected.items():
        assert words in reasons.get(node, ""), (node, reasons)
    onnx.checker.check_model(result.model, full_check=True)
