"""The quantize pass's IR boundary: it exports the gs graph to a ModelProto once, works on protos, and
writes the chosen model back once (`passes/quantize/boundary.py`). The round trip must be exact, and
the graph after the pass must hold exactly the model the proto path built."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxopt.data.samples import CalibrationData
from onnxopt.framework.context import PassContext
from onnxopt.framework.registry import get_pass
from onnxopt.ir.graph import export_model, import_model
from onnxopt.passes.quantize import boundary, quantizer

PACKAGE = Path(quantizer.__file__).parent


def _model() -> onnx.ModelProto:
    """Gemm -> Relu -> MatMul (float, quantizable), a MatMul already in QDQ form (int8 weight through
    DequantizeLinear), and an If whose branches hold small MatMuls (too small for int8 storage)."""
    rng = np.random.default_rng(0)

    def branch(tag: str) -> onnx.GraphProto:
        mm = h.make_node("MatMul", ["q", f"B_{tag}"], [f"o_{tag}"], name=f"body_mm_{tag}")
        return h.make_graph([mm], f"br_{tag}", [], [h.make_tensor_value_info(f"o_{tag}", T.FLOAT, [1, 8])])

    nodes = [
        h.make_node("Gemm", ["x", "G", "GB"], ["a"], name="gemm"),
        h.make_node("Relu", ["a"], ["r"], name="relu"),
        h.make_node("MatMul", ["r", "M"], ["m"], name="mm"),
        h.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wdq"], name="pre_dq"),
        h.make_node("MatMul", ["m", "Wdq"], ["q"], name="pre_mm"),
        h.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
        h.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        h.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch("a"), else_branch=branch("b")),
    ]
    inits = [
        nh.from_array((rng.standard_normal((32, 64)) * 0.2).astype(np.float32), "G"),
        nh.from_array((rng.standard_normal(64) * 0.1).astype(np.float32), "GB"),
        nh.from_array((rng.standard_normal((64, 64)) * 0.2).astype(np.float32), "M"),
        nh.from_array(rng.integers(-127, 128, (64, 64)).astype(np.int8), "Wq"),
        nh.from_array(np.float32(0.01), "Ws"),
        nh.from_array(np.int8(0), "Wz"),
        nh.from_array(np.zeros((1,), np.float32), "zero"),
        nh.from_array((rng.standard_normal((64, 8)) * 0.2).astype(np.float32), "B_a"),
        nh.from_array((rng.standard_normal((64, 8)) * 0.2).astype(np.float32), "B_b"),
    ]
    g = h.make_graph(
        nodes,
        "boundary",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 32])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 8])],
        inits,
    )
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(graph before as a proto, the model the proto path built, the graph after the pass, the result)."""
    model = _model()
    graph = import_model(model)
    before = export_model(graph)
    built: list[onnx.ModelProto] = []
    real = quantizer.write_back

    def spy(g, final: onnx.ModelProto) -> None:
        built.append(final)
        real(g, final)

    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(6)]
    quantize = get_pass("quantize")
    options = quantize.Options(latency_aware=False, check_latency=False, cache=False, sensitivity_samples=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONNXOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(quantizer, "write_back", spy)
        result = quantize(options).run(graph, PassContext(CalibrationData(data, model)))
    assert result.changed and len(built) == 1
    return before, built[0], graph, result


def test_round_trip_through_the_boundary_is_exact():
    """Export, write back, export again: the same bytes, control-flow body and QDQ layer included."""
    graph = import_model(_model())
    proto = boundary.to_proto(graph)
    assert {n.op_type for n in proto.graph.node} >= {"If", "DequantizeLinear"}
    boundary.write_back(graph, proto)
    assert boundary.to_proto(graph).SerializeToString() == proto.SerializeToString()


def _nodes(model: onnx.ModelProto) -> list[bytes]:
    return sorted(n.SerializeToString() for n in model.graph.node)


def test_graph_after_the_pass_holds_exactly_the_model_the_proto_path_built(quantized):
    """The graph exports to the built model: the same nodes (in topological order, which export
    re-establishes), initializers, inputs, outputs and opsets."""
    _, built, graph, _ = quantized
    after = export_model(graph)
    assert _nodes(after) == _nodes(built)
    assert {t.name: t.SerializeToString() for t in after.graph.initializer} == {
        t.name: t.SerializeToString() for t in built.graph.initializer
    }
    assert [v.SerializeToString() for v in after.graph.input] == [v.SerializeToString() for v in built.graph.input]
    assert [v.SerializeToString() for v in after.graph.output] == [v.SerializeToString() for v in built.graph.output]
    assert [(o.domain, o.version) for o in after.opset_import] == [(o.domain, o.version) for o in built.opset_import]
    assert after.SerializeToString() == export_model(import_model(built)).SerializeToString()


def test_the_pass_changes_only_what_it_adds(quantized):
    """The already-quantized layer and the If with its bodies come through untouched; every other node
    keeps its op and attributes and reads, besides its old inputs, only tensors the pass added; the
    initializers left in place keep their bytes."""
    before, _, graph, result = quantized
    after = export_model(graph)
    old = {n.name: n for n in before.graph.node}
    new = {n.name: n for n in after.graph.node}
    for name in ("pre_dq", "pre_mm", "branchy"):
        assert new[name].SerializeToString() == old[name].SerializeToString(), name
    old_tensors = {t for n in before.graph.node for t in [*n.input, *n.output]}
    for name, n in old.items():
        assert new[name].op_type == n.op_type and list(new[name].attribute) == list(n.attribute)
        assert all(t in n.input or t not in old_tensors for t in new[name].input), name
    kept = {t.name: t for t in after.graph.initializer}
    for t in before.graph.initializer:
        assert t.name not in kept or kept[t.name].SerializeToString() == t.SerializeToString()
    rows = {r["node"]: r for r in result.details}
    assert rows["pre_mm"]["already_int8"] and rows["gemm"]["int8"]
    assert "weight_storage" in rows["body_mm_a"] and "weight_storage" in rows["body_mm_b"]


def test_only_the_boundary_module_converts_between_the_irs():
    """No other module of the package imports the graph <-> proto conversions."""
    crossings = {"export_model", "import_model", "export_onnx", "import_onnx"}
    for path in PACKAGE.glob("*.py"):
        if path.name == "boundary.py":
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
        attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not (names | attrs) & crossings, path.name
