"""Each onnx-graphsurgeon internal `onnxopt.ir.gs_compat` relies on, exercised directly.

A gs release that renames or changes one of them fails here first, with the name of the
internal in the test, rather than somewhere deep in a pass.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxopt.ir import gs_compat, weights


def _lazy_constant(values: np.ndarray, name: str = "w") -> gs.Constant:
    return gs.Constant(name, gs_compat.LazyValues(numpy_helper.from_array(values, name)))


def test_lazy_values_expose_tensor_shape_dtype_and_load():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    lazy = gs_compat.LazyValues(numpy_helper.from_array(arr, "w"))
    assert lazy.tensor.name == "w"
    assert tuple(lazy.shape) == (2, 3)
    assert np.dtype(lazy.dtype) == np.float32
    np.testing.assert_array_equal(lazy.load(), arr)


def test_stored_values_reads_without_loading_and_set_stored_values_writes():
    arr = np.ones((2, 2), np.float32)
    c = _lazy_constant(arr)
    assert isinstance(gs_compat.stored_values(c), gs_compat.LazyValues)
    assert gs_compat.lazy_tensor(c).name == "w"
    assert tuple(c.shape) == (2, 2) and np.dtype(c.dtype) == np.float32  # metadata without loading
    assert isinstance(gs_compat.stored_values(c), gs_compat.LazyValues)
    np.testing.assert_array_equal(c.values, arr)  # `values` loads and keeps the array
    assert isinstance(gs_compat.stored_values(c), np.ndarray) and gs_compat.lazy_tensor(c) is None
    gs_compat.set_stored_values(c, gs_compat.LazyValues(numpy_helper.from_array(2 * arr, "w")))
    np.testing.assert_array_equal(c.values, 2 * arr)


def test_stored_values_survive_a_variable_round_trip():
    """The exporter hides constants as typed variables and restores them from their stored values."""
    c = _lazy_constant(np.zeros(3, np.int64))
    values = gs_compat.stored_values(c)
    c.to_variable(dtype=c.dtype, shape=c.shape)
    assert gs_compat.stored_values(c) is None
    c.to_constant(values)
    assert gs_compat.stored_values(c) is values


def test_mapped_values_load_through_the_subclass():
    arr = np.arange(1024, dtype=np.float32)
    proto = onnx.TensorProto(name="big")
    weights.spill(arr, proto)
    c = gs.Constant("big", np.zeros(1, np.float32))
    gs_compat.map_staged(c, proto)
    assert isinstance(gs_compat.stored_values(c), gs_compat.MappedValues)
    assert tuple(c.shape) == (1024,)
    np.testing.assert_array_equal(c.values, arr)


def test_export_dtype_override_reads_the_internal_field():
    """`_export_dtype` exists (None: gs writes the values as they are). Setting it needs an onnx with
    `float32_to_bfloat16` (<= 1.19), so the field is set directly to check the accessor reads it."""
    c = gs.Constant("c", np.ones(2, np.float32))
    assert "_export_dtype" in vars(c)
    assert gs_compat.export_dtype_override(c) is None
    c._export_dtype = np.float16
    assert gs_compat.export_dtype_override(c) == np.float16 and c.export_dtype == np.float16


def test_exporter_writes_tensor_node_and_value_info():
    c = gs.Constant("c", np.arange(4, dtype=np.int64))
    t = gs_compat.export_tensor_proto(c)
    assert t.name == "c" and list(t.dims) == [4]
    np.testing.assert_array_equal(numpy_helper.to_array(t), np.arange(4))
    x = gs.Variable("x", dtype=np.float32, shape=["n", 4])
    y = gs.Variable("y", dtype=np.float32)
    node = gs.Node("Add", name="add", inputs=[x, c], outputs=[y], attrs={})
    n = gs_compat.export_node(node)
    assert (n.op_type, n.name, list(n.input), list(n.output)) == ("Add", "add", ["x", "c"], ["y"])
    vi = gs_compat.export_value_info(x)
    assert vi.name == "x" and vi.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] == ["n", 4]


def test_export_node_carries_subgraph_attributes():
    body = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "body", [], [helper.make_tensor_value_info("b", 1, [1])]
    )
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("If", ["cond"], ["out"], then_branch=body, else_branch=body, name="if")],
            "g",
            [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("a", 1, [1])],
            [helper.make_tensor_value_info("out", 1, [1])],
        )
    )
    graph = gs.import_onnx(model)
    n = gs_compat.export_node(graph.nodes[0])
    assert {a.name for a in n.attribute} == {"then_branch", "else_branch"}
    assert n.attribute[0].g.node[0].op_type == "Identity"


def test_route_logging_sends_gs_warnings_to_stderr_and_quiet_keeps_errors(monkeypatch):
    monkeypatch.setattr(G_LOGGER, "log", G_LOGGER.log)
    monkeypatch.setattr(G_LOGGER, "severity", G_LOGGER.INFO)
    gs_compat.route_logging(quiet=False)
    gs_compat.route_logging(quiet=False)  # idempotent: not wrapped twice
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        G_LOGGER.warning("gs compat warning")
    assert "gs compat warning" not in out.getvalue() and err.getvalue().count("gs compat warning") == 1
    gs_compat.route_logging(quiet=True)
    assert G_LOGGER.severity == G_LOGGER.ERROR


def test_exportable_types_round_trip_through_gs():
    """gs exports the value types `EXPORTABLE_TYPES` names (the importer restores the others)."""
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("SequenceLength", ["s"], ["n"])],
            "g",
            [seq],
            [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    out = gs.export_onnx(gs.import_onnx(model), do_type_check=False)
    assert out.graph.input[0].type.WhichOneof("value") in gs_compat.EXPORTABLE_TYPES
