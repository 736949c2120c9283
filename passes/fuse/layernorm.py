"""LayerNormalization from its decomposed form, for every target:

    m = ReduceMean(x, last axis); d = x - m; v = ReduceMean(d^2 or d*d, last axis)
    y = d / Sqrt(v + eps)   (or d * Reciprocal(Sqrt(v + eps)))   [* gamma] [+ beta]

becomes LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps) (opset >= 17; an older model keeps
the pattern and says so). Every intermediate must feed only the next step of the pattern, eps must
be one float32 constant value, gamma and beta float32 constants over the last axis only, and the size
of that axis known.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, detach, is_constant
from onnxopt.passes.fuse.matching import (
    FusionTarget,
    hidden_input,
    hidden_vector,
    last_dim,
    only_reader,
    other_input,
    read_only_by,
    scalar_operand,
)
from onnxopt.passes.fuse.scope import Scope


def reduces_last_axis(sc: Scope, node: gs.Node, rank: int | None) -> bool:
    """Whether a ReduceMean keeps dims and reduces exactly the last axis of a rank-`rank` input."""
    if node.attrs.get("keepdims", 1) != 1:
        return False
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and is_constant(node.inputs[1]):
        v = constant_value(node.inputs[1])
        axes = [] if v is None else [int(a) for a in v.reshape(-1)]
    else:
        return False
    return axes == [-1] or (rank is not None and axes == [rank - 1])


def _square_and_scale(sc: Scope, d: gs.Tensor) -> tuple[gs.Node, gs.Node] | None:
    """The two readers of d = x - mean: its square (Pow(d, 2) or Mul(d, d)) and its scaling (Div or Mul)."""
    readers = list({id(n): n for n in d.outputs}.values())
    if len(readers) != 2 or not read_only_by(sc, d, readers):
        return None
    for sq, scale in (readers, readers[::-1]):
        squared = (sq.op == "Mul" and sq.inputs[0] is d and sq.inputs[1] is d) or (
            sq.op == "Pow" and sq.inputs[0] is d and _is_two(sc, sq)
        )
        if squared and scale.op in ("Div", "Mul"):
            return sq, scale
    return None


def _is_two(sc: Scope, pow_node: gs.Node) -> bool:
    found = scalar_operand(sc, pow_node)
    return found is not None and found[0] is pow_node.inputs[0] and found[1] == 2.0


def _denominator(sc: Scope, d: gs.Tensor, sq: gs.Node, scale: gs.Node, rank: int | None) -> tuple[float, list] | None:
    """(eps, nodes from the variance to the scaling) when `scale` divides `d` by Sqrt(mean(sq) + eps)."""
    rm2 = only_reader(sc, sq.outputs[0], "ReduceMean")
    if rm2 is None or not reduces_last_axis(sc, rm2, rank):
        return None
    add = only_reader(sc, rm2.outputs[0], "Add")
    if add is None:
        return None
    found = scalar_operand(sc, add)
    if found is None or found[0] is not rm2.outputs[0]:
        return None
    sqrt = only_reader(sc, add.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    nodes = [sq, rm2, add, sqrt]
    std = sqrt.outputs[0]
    if scale.op == "Div":
        ok = scale.inputs[0] is d and scale.inputs[1] is std and read_only_by(sc, std, [scale])
    else:
        recip = only_reader(sc, std, "Reciprocal")
        if recip is None:
            return None
        ok = other_input(scale, d) is recip.outputs[0] and read_only_by(sc, recip.outputs[0], [scale])
        nodes.append(recip)
    return (found[1], nodes) if ok and found[1] >= 0 else None


def _affine(sc: Scope, n: gs.Tensor, hidden: int, rank: int | None) -> tuple:
    """((gamma tensor, values) or None, (beta tensor, values) or None, output tensor, nodes) of the
    optional Mul(gamma) and Add(beta) after the normalization."""
    found: list = []
    nodes: list[gs.Node] = []
    out = n
    for op in ("Mul", "Add"):
        node = only_reader(sc, out, op)
        c = other_input(node, out) if node is not None else None
        v = hidden_vector(c, hidden, rank) if c is not None else None
        found.append(None if v is None else (c, v))
        if v is not None and node is not None:
            out = node.outputs[0]
            nodes.append(node)
    return found[0], found[1], out, nodes


def fuse_layernorm(ft: FusionTarget, sc: Scope, rm1: gs.Node) -> bool:
    """Replace the decomposed layer normalization starting at ReduceMean `rm1`; whether it did."""
    x = rm1.inputs[0]
    rank = sc.rank(x)
    if not reduces_last_axis(sc, rm1, rank):
        return False
    sub = only_reader(sc, rm1.outputs[0], "Sub")
    if sub is None or sub.inputs[0] is not x or sub.inputs[1] is not rm1.outputs[0]:
        return False
    d = sub.outputs[0]
    pair = _square_and_scale(sc, d)
    if pair is None:
        return False
    sq, scale = pair
    found = _denominator(sc, d, sq, scale, rank)
    hidden = last_dim(sc, x)
    if found is None or hidden is None:
        return False
    eps, middle = found
    gamma, beta, out, tail = _affine(sc, scale.outputs[0], hidden, rank)
    if not ft.has("LayerNormalization"):
        ft.leave(
            sc,
            rm1,
            "layernorm_left_decomposed",
            f"decomposed LayerNorm left: LayerNormalization needs opset >= 17, the model has {ft.opset}",
        )
        return False
    base = rm1.name or "LayerNorm"
    g_tensor, g_value = gamma if gamma is not None else (None, np.ones(hidden, np.float32))
    inputs = [x, hidden_input(sc, g_tensor, g_value, f"{base}_gamma")]
    if beta is not None:
        inputs.append(hidden_input(sc, beta[0], beta[1], f"{base}_beta"))
    for node in [rm1, sub, *middle, scale, *tail]:
        detach(node)
    ft.new_node(sc, "LayerNormalization", base, inputs, [out], axis=-1, epsilon=float(eps))
    return True
