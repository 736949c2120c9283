"""Which nodes can compute in float16, and which of their inputs follow the compute type.

Read from the ONNX operator schemas, not from a list: a node can run in float16
when its float32 outputs take their element type from a type parameter that
also types some of its inputs and that allows `tensor(float16)`. Exactly the
inputs typed by that parameter are converted; the others keep their type
(Resize's `roi` and `scales`, shape and index inputs). Nodes whose output type
comes from an attribute (Cast, Constant, RandomNormal) or that hold a body
(If, Loop, Scan) stay float32, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.ops import ops_where

FLOAT = onnx.TensorProto.FLOAT
FLOAT16 = onnx.TensorProto.FLOAT16

#: Ops that already compute on quantized integers or convert to and from them: left to the quantizers.
_QUANTIZED = frozenset(ops_where("integer")) | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclass(frozen=True)
class Eligible:
    """A node that can run in float16: the input positions that take the compute type."""

    slots: tuple[int, ...]


def classify(node: gs.Node, opset: int, elem_types: dict[str, int]) -> Eligible | str:
    """`Eligible` with the converted input positions, or the reason `node` stays float32."""
    if node.domain not in (None, "", "ai.onnx"):
        return f"operator of domain '{node.domain}' has no ONNX schema to check float16 support"
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "control flow: the node and its bodies stay float32"
    if node.op in _QUANTIZED:
        return "quantized operator, left to the quantizers"
    floats = [i for i, t in enumerate(node.outputs) if elem_types.get(t.name) == FLOAT]
    if not floats:
        return "no float32 output"
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return f"no schema for {node.op} at opset {opset}"
    return _by_schema(node, schema, floats, elem_types)


def _by_schema(
    node: gs.Node, schema: onnx.defs.OpSchema, floats: list[int], elem_types: dict[str, int]
) -> Eligible | str:
    """`classify` for a node with float32 outputs at positions `floats`, from its op's schema."""
    params = {_formal(schema.outputs, i).type_str for i in floats}
    slots = tuple(i for i in range(len(node.inputs)) if _formal(schema.inputs, i).type_str in params)
    if not slots:
        return "the output type comes from an attribute, not from an input"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    if any("tensor(float16)" not in allowed.get(p, ()) for p in params):
        return f"{node.op} has no float16 form at opset {schema.since_version}"
    typed = [t.name for i, t in enumerate(node.outputs) if t.name and _typed_by(schema, i, params)]
    if any(elem_types.get(name) != FLOAT for name in typed):
        return "an output of the compute type is not float32"
    if any(node.inputs[i].name and elem_types.get(node.inputs[i].name) != FLOAT for i in slots):
        return "an input of the compute type has no inferred float32 type"
    return Eligible(slots)


def _formal(params: Sequence[onnx.defs.OpSchema.FormalParameter], i: int) -> onnx.defs.OpSchema.FormalParameter:
    """The formal parameter of position `i` (the last one covers a variadic tail)."""
    return params[min(i, len(params) - 1)]


def _typed_by(schema: onnx.defs.OpSchema, i: int, params: set[str]) -> bool:
    return _formal(schema.outputs, i).type_str in params
