"""Shapes through onnxruntime's com.microsoft ops, which `onnx.shape_inference` does not know: every
tensor after a fused Gelu, SkipLayerNormalization or Attention would be of unknown shape, and the
fusions after it could prove nothing. For inference only, each such node of the main graph is
replaced by standard ops that compute tensors of the same shapes (Identity, Add, a MatMul by a
typed stand-in weight); the model is never run.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxopt.ir.ops import CONTRIB_DOMAIN

#: Contrib ops whose output has the shape of their first input, or of the broadcast of their first two.
_SAME_AS_INPUT = ("Gelu", "FastGelu", "QuickGelu", "BiasGelu", "BiasAdd")
_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
#: Contrib MatMul forms: output [..., N] from input [..., K].
_MATMULS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _typed_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static dims of the main graph's initializers and typed inputs (constants exported as inputs)."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for vi in model.graph.input:
        shape = vi.type.tensor_type.shape
        if vi.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in shape.dim):
            dims.setdefault(vi.name, [d.dim_value for d in shape.dim])
    return dims


def _matmul_columns(node: onnx.NodeProto, dims: dict[str, list[int]]) -> int | None:
    """The output columns of a contrib MatMul form: attribute N (MatMulNBits) or its weight's last dim."""
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs.get("N")
    w = dims.get(node.input[1])
    return w[-1] if w and len(w) == 2 else None


def _matmul_standin(node: onnx.NodeProto, dims: dict[str, list[int]], extra: list) -> list[onnx.NodeProto] | None:
    """A MatMul by a typed stand-in weight [k, N] for a contrib MatMul form; None if N is unknown."""
    n = _matmul_columns(node, dims)
    if n is None:
        return None
    name = node.name or node.output[0]
    w = f"{name}__standin_weight"
    extra.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, ["k", n]))
    return [helper.make_node("MatMul", [node.input[0], w], list(node.output[:1]), name=name)]


def _standin(node: onnx.NodeProto, dims: dict[str, list[int]], extra: list) -> list[onnx.NodeProto] | None:
    """Standard nodes giving `node`'s (first, and residual) outputs their shapes; None if unknown."""
    ins, outs = [i for i in node.input], list(node.output)
    name = node.name or outs[0]
    if node.op_type in _SAME_AS_INPUT:
        if len(ins) > 1 and ins[1]:
            return [helper.make_node("Add", ins[:2], outs[:1], name=name)]
        return [helper.make_node("Identity", ins[:1], outs[:1], name=name)]
    if node.op_type in _SKIP_NORMS:
        total = f"{name}__standin_sum"
        nodes = [helper.make_node("Add", ins[:2], [total], name=name)]
        keep = [o for k, o in enumerate(outs) if o and k in (0, 3)]
        return nodes + [helper.make_node("Identity", [total], [o], name=f"{name}__{o}") for o in keep]
    if node.op_type in _MATMULS and len(ins) > 1:
        return _matmul_standin(node, dims, extra)
    if node.op_type in ("Attention", "QAttention") and len(ins) > 1 and ins[1] in dims and len(dims[ins[1]]) == 2:
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), [])
        k, n3 = dims[ins[1]]
        v = sizes[2] if len(sizes) == 3 else n3 // 3
        w = f"{name}__standin_weight"
        extra.append(helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, [k, v]))
        return [helper.make_node("MatMul", [ins[0], w], outs[:1], name=name)]
    return None


def with_standins(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a structure export, changed in place) with its com.microsoft nodes of known shapes
    replaced by standard stand-ins; the same model when it has none."""
    g = model.graph
    if not any(n.domain == CONTRIB_DOMAIN for n in g.node):
        return model
    dims = _typed_dims(model)
    extra: list[onnx.ValueInfoProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        repl = _standin(node, dims, extra) if node.domain == CONTRIB_DOMAIN else None
        nodes.extend(repl if repl is not None else [node])
    del g.node[:]
    g.node.extend(nodes)
    g.input.extend(extra)
    return model
