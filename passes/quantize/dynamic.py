"""The dynamic int8 form of a MatMul with a constant weight, as onnxruntime's CPU EP fuses it.

DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, x_zp, W_zp) -> Cast -> Mul(x_scale * W_scale)
computes x @ W with the input quantized per run from its own range (no calibrated scale to go
stale on outliers) and the weight int8 per output channel. onnxruntime fuses the group into
DynamicQuantizeMatMul (one reader of x) or DynamicQuantizeLinear + MatMulIntegerToFloat
(several, e.g. Q/K/V), taking a following bias Add in; the output stays float, so the
LayerNormalization, GELU and residual Adds around it keep float inputs and their own fusions.
One DynamicQuantizeLinear serves every dynamic layer that reads the same tensor.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

#: The `LayerQuant.form` of a dynamic layer (a static one is "qdq").
DYNAMIC = "dynamic"


def dql_outputs(tensor: str) -> list[str]:
    """The (quantized, scale, zero point) outputs of the DynamicQuantizeLinear of `tensor`."""
    return [f"{tensor}_dynq", f"{tensor}_dyns", f"{tensor}_dynzp"]


def dql_node(tensor: str) -> onnx.NodeProto:
    """The DynamicQuantizeLinear that every dynamic layer reading `tensor` shares."""
    return helper.make_node(
        "DynamicQuantizeLinear", [tensor], dql_outputs(tensor), name=f"{tensor}_DynamicQuantizeLinear"
    )


def dynamic_layer_nodes(node: onnx.NodeProto, weight: list[str]) -> list[onnx.NodeProto]:
    """The nodes that replace MatMul `node` (its input 0 quantized by `dql_node`, its output name
    kept): MatMulInteger, named as the layer so a reader of onnxruntime's optimized graph can
    tell whether it was left unfused, then Cast and the two scale Muls. `weight`: the names of
    the int8 weight, its scales and its zero points."""
    xq, xs, xz = dql_outputs(node.input[0])
    wq, ws, wz = weight
    base = node.name
    return [
        helper.make_node("MatMulInteger", [xq, wq, xz, wz], [base + "_int32"], name=base),
        helper.make_node("Cast", [base + "_int32"], [base + "_f"], name=base + "_Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [xs, ws], [base + "_scale"], name=base + "_scale_Mul"),
        helper.make_node("Mul", [base + "_f", base + "_scale"], [node.output[0]], name=base + "_Mul"),
    ]


def dynamic_int8_nodes(node: onnx.NodeProto, op: str, weight: list[str]) -> list[onnx.NodeProto]:
    """The node that replaces com.microsoft `node` (an Attention) by its int8 op `op` (QAttention):
    input 0 quantized by `dql_node`, the int8 weight with one scale and zero point per output
    column, the float bias, mask and attributes (num_heads, ...) as they were, name and output
    kept (a reader of onnxruntime's optimized graph finds it by name). QAttention's inputs:
    (x_q, w_q, bias, x_scale, w_scale, mask_index, x_zp, w_zp[, past])."""
    xq, xs, xz = dql_outputs(node.input[0])
    wq, ws, wz = weight
    mask = node.input[3] if len(node.input) > 3 else ""
    past = list(node.input[4:5])
    inputs = [xq, wq, node.input[2], xs, ws, mask, xz, wz, *past]
    q = helper.make_node(op, inputs, list(node.output), name=node.name, domain=node.domain)
    q.attribute.extend(node.attribute)
    return [q]
