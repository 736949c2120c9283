"""Constants of the ONNX types numpy lacks (4-bit and 2-bit, packed several to a byte; float8;
bfloat16) survive an import, a read of their values and an export with the bytes they had.

onnx-graphsurgeon writes an array's `tobytes()`, one byte per element; once a pass reads a uint4
constant's values (an ml_dtypes array) the export failed with "Raw data size does not match".
`onnxopt.ir.gs_compat` routes such arrays through onnx's own `numpy_helper.from_array`.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.framework.context import PassContext
from onnxopt.framework.registry import get_pass
from onnxopt.ir.constants import all_constants, constant_value
from onnxopt.ir.graph import export_model, import_model
from onnxopt.ir.gs_compat import export_node, export_tensor_proto, onnx_layout_array
from onnxopt.testing import apply_pass, model_from_text

#: ONNX element types numpy has no dtype for, each with values it can hold exactly.
SUBBYTE = ["UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2"]
WIDER = ["FLOAT8E4M3FN", "FLOAT8E5M2", "BFLOAT16"]


def _values(type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(getattr(TensorProto, type_name))
    lo = -2 if type_name.startswith("INT") or type_name.startswith("FLOAT") else 0
    hi = 1 if type_name == "INT2" else 3
    return np.random.default_rng(0).integers(lo, hi + 1, size=shape).astype(np.float32).astype(dtype)


def _identity_model(type_name: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """One initializer `c` of the type (odd element count: a half-filled last byte), read by Identity
    (the latest opset: int2 and uint2 are recent)."""
    c = numpy_helper.from_array(_values(type_name, shape), "c")
    dt = getattr(TensorProto, type_name)
    g = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["y"])], "g", [], [helper.make_tensor_value_info("y", dt, shape)], [c]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version())])


def _touch_all(graph: gs.Graph) -> None:
    """Load every constant's values, as a pass reading them does (gs then holds numpy arrays)."""
    for t in all_constants(graph):
        assert constant_value(t) is not None


@pytest.mark.parametrize("into", [False, True], ids=["fresh", "into_source"])
@pytest.mark.parametrize("type_name", SUBBYTE + WIDER)
def test_round_trip_with_values_read_keeps_the_bytes(type_name: str, into: bool) -> None:
    model = _identity_model(type_name, (3, 5))
    source = model.graph.initializer[0]
    graph = import_model(model)
    _touch_all(graph)
    c = graph.tensors()["c"]
    assert isinstance(c.values, np.ndarray) and onnx_layout_array(c) is not None
    out = export_model(graph, into=copy.deepcopy(model) if into else None)
    onnx.checker.check_model(out, full_check=True)
    (init,) = out.graph.initializer
    assert init.data_type == source.data_type and list(init.dims) == list(source.dims)
    assert init.raw_data == source.raw_data
    np.testing.assert_array_equal(numpy_helper.to_array(init), numpy_helper.to_array(source))


@pytest.mark.parametrize("type_name", SUBBYTE)
def test_new_constant_from_an_array_is_packed(type_name: str) -> None:
    """A constant a pass builds from an ml_dtypes array is written packed, directly and in a node."""
    arr = _values(type_name, (4, 3))
    proto = export_tensor_proto(gs.Constant("k", arr))
    assert proto.raw_data == numpy_helper.from_array(arr).raw_data and len(proto.raw_data) < arr.size
    node = export_node(gs.Node("Constant", attrs={"value": gs.Constant("k", arr)}, outputs=[gs.Variable("o")]))
    np.testing.assert_array_equal(numpy_helper.to_array(node.attribute[0].t), arr)


def test_native_arrays_and_requested_conversions_stay_with_graphsurgeon() -> None:
    """Arrays numpy types itself, and arrays gs is asked to convert on export, are gs's to write."""
    assert onnx_layout_array(gs.Constant("f", np.ones(3, np.float32))) is None
    assert export_tensor_proto(gs.Constant("f", np.ones(3, np.float32))).raw_data == np.ones(3, np.float32).tobytes()
    bf = np.ones(3, ml_dtypes.bfloat16)
    assert onnx_layout_array(gs.Constant("b", bf, export_dtype=TensorProto.FLOAT)) is None
    assert onnx_layout_array(gs.Constant("b", bf)) is bf


def _blocked_dequantize_model(zero_point_in_node: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """uint4 codes (64 x 8, blocks of 32 along K) -> DequantizeLinear (opset 21) -> MatMul; the zero
    point an initializer or a Constant node's value. Returns the model and the dequantized weight."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(64, 8))
    scales = rng.uniform(0.01, 0.1, size=(2, 8)).astype(np.float32)
    zps = rng.integers(0, 16, size=(2, 8))
    zp = numpy_helper.from_array(zps.astype(ml_dtypes.uint4), "z")
    nodes = [helper.make_node("Constant", [], ["z"], value=zp)] if zero_point_in_node else []
    nodes += [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=0, block_size=32),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    inits = [numpy_helper.from_array(codes.astype(ml_dtypes.uint4), "w"), numpy_helper.from_array(scales, "s")]
    if not zero_point_in_node:
        inits.append(zp)
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    weight = (codes - np.repeat(zps, 32, axis=0)) * np.repeat(scales, 32, axis=0)
    return model, weight


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("zero_point_in_node", [False, True], ids=["initializer", "constant_node"])
def test_blocked_uint4_dequantize_round_trip_runs(zero_point_in_node: bool) -> None:
    model, weight = _blocked_dequantize_model(zero_point_in_node)
    onnx.checker.check_model(model, full_check=True)
    graph = import_model(model)
    _touch_all(graph)
    out = export_model(graph)
    onnx.checker.check_model(out, full_check=True)
    assert {i.name: i.raw_data for i in out.graph.initializer} == {i.name: i.raw_data for i in model.graph.initializer}
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), x @ weight, rtol=1e-5, atol=1e-5)


def test_fold_after_weightonly_on_openvino_reading_the_codes() -> None:
    """weightonly (openvino: blocked uint4 DequantizeLinear), a pass reading every constant's values,
    then fold, in one graph: the export is valid and computes what weightonly's model computes."""
    w1, w2 = (np.random.default_rng(s).standard_normal((128, 128)) * 0.1 for s in (3, 4))
    text = """<ir_version: 8, opset_import: ["" : 21]>
    g (float[B, 128] x) => (float[B, 128] y) { h = MatMul(x, W1)
    y = MatMul(h, W2) }"""
    model = model_from_text(text, {"W1": w1.astype(np.float32), "W2": w2.astype(np.float32)})
    options = {"bits": "4", "block": "32", "timing": "false", "min_elements": "0", "rounding": "rtn"}
    ref, res = apply_pass("weightonly", model, options=options, settings={"target": "openvino"})
    assert res.changed
    wo = get_pass("weightonly")
    graph = import_model(model)
    assert wo(wo.parse_options(options)).run(graph, PassContext(None, {"target": "openvino"})).changed
    _touch_all(graph)
    codes = [t for t in all_constants(graph) if np.dtype(t.dtype) == ml_dtypes.uint4]
    assert len(codes) == 4 and all(isinstance(t.values, np.ndarray) for t in codes)
    fold = get_pass("fold")
    fold(None).run(graph, PassContext(None, {"target": "openvino"}))
    out = export_model(graph)
    onnx.checker.check_model(out, full_check=True)
    assert {n.op_type for n in out.graph.node} == {"DequantizeLinear", "MatMul"}
    packed = {i.name: i.raw_data for i in ref.graph.initializer if i.data_type == TensorProto.UINT4}
    assert {i.name: i.raw_data for i in out.graph.initializer if i.name in packed} == packed
    x = np.random.default_rng(5).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(ref, x), rtol=1e-6, atol=1e-6)
