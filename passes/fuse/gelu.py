"""GELU from its decomposed forms, in the orderings exporters write:

- exact (Erf): x * 0.5 * (1 + Erf(x / sqrt(2)))  (Div by sqrt(2) or Mul by 1/sqrt(2); the 0.5
  applied first, last, or to x on its own branch);
- tanh: 0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (x^3 as Pow(x, 3) or x * x * x).

Targets cpu and cuda get onnxruntime's com.microsoft Gelu / FastGelu, or BiasGelu / FastGelu with
its bias input when x = Add(y, constant bias over the last axis) read by nothing else. Other targets
get the standard Gelu (approximate="tanh" for the tanh form) when the model's opset has it (>= 20);
older models keep the pattern and say so. Constants must match to 1e-4 (exporters round sqrt(2)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import detach, is_constant
from onnxopt.passes.fuse.matching import (
    FusionTarget,
    f32_constant,
    is_value,
    last_dim,
    made_by,
    only_reader,
    other_input,
    read_only_by,
)
from onnxopt.passes.fuse.scope import Scope

#: How far an irrational constant of the pattern may be from its value (float32 exports round them).
_RTOL = 1e-4
_SQRT2 = float(np.sqrt(2.0))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_CUBIC = 0.044715


@dataclass
class _Match:
    """A matched GELU: its input, its output, its nodes, and the nodes among them that read x."""

    x: gs.Tensor
    out: gs.Tensor
    nodes: list[gs.Node]
    readers: list[gs.Node]
    tanh: bool


def _erf_argument(sc: Scope, erf: gs.Node) -> tuple[gs.Tensor, gs.Node] | None:
    """(x, the node computing x / sqrt(2)) feeding `erf`."""
    scaled = made_by(sc, erf.inputs[0], ("Div", "Mul"))
    if scaled is None or not read_only_by(sc, erf.inputs[0], [erf]):
        return None
    if scaled.op == "Div":
        x = is_value(sc, scaled, _SQRT2, _RTOL)
        return (x, scaled) if x is not None and scaled.inputs[0] is x else None
    x = is_value(sc, scaled, 1.0 / _SQRT2, _RTOL)
    return (x, scaled) if x is not None else None


def _cube(sc: Scope, t: gs.Tensor, reader: gs.Node) -> tuple[gs.Tensor, list[gs.Node], list[gs.Node]] | None:
    """(x, nodes, readers of x) when `t`, read by `reader` only, is Pow(x, 3) or x * x * x (any grouping)."""
    p = made_by(sc, t, ("Pow", "Mul"))
    if p is None or not read_only_by(sc, t, [reader]):
        return None
    if p.op == "Pow":
        x = is_value(sc, p, 3.0)
        return (x, [p], [p]) if x is not None and p.inputs[0] is x else None
    for k in (0, 1):
        sq = made_by(sc, p.inputs[k], "Mul")
        x = p.inputs[1 - k]
        if sq is not None and sq.inputs[0] is x and sq.inputs[1] is x and read_only_by(sc, p.inputs[k], [p]):
            return x, [sq, p], [sq, p]
    return None


def _tanh_argument(sc: Scope, tanh: gs.Node) -> tuple[gs.Tensor, list[gs.Node], list[gs.Node]] | None:
    """(x, nodes, readers of x) of sqrt(2/pi) * (x + 0.044715 * x^3) feeding `tanh`."""
    outer = made_by(sc, tanh.inputs[0], "Mul")
    if outer is None or not read_only_by(sc, tanh.inputs[0], [tanh]):
        return None
    s = is_value(sc, outer, _SQRT_2_OVER_PI, _RTOL)
    add = made_by(sc, s, "Add") if s is not None else None
    if add is None or not read_only_by(sc, s, [outer]):
        return None
    for k in (0, 1):
        x, poly = add.inputs[k], add.inputs[1 - k]
        mul = made_by(sc, poly, "Mul")
        cube = is_value(sc, mul, _CUBIC, _RTOL) if mul is not None else None
        found = _cube(sc, cube, mul) if cube is not None and read_only_by(sc, poly, [add]) else None
        if found is not None and found[0] is x:
            return x, [*found[1], mul, add, outer], [*found[2], add]
    return None


def _product(sc: Scope, x: gs.Tensor, a: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node], list[gs.Node]] | None:
    """(output, nodes, readers of x) of x * a * 0.5 in any grouping, `a` = 1 + erf/tanh."""
    m1 = only_reader(sc, a, "Mul")
    o = other_input(m1, a) if m1 is not None else None
    if m1 is None or o is None or o is a:
        return None
    if o is x or is_constant(o):
        m2 = only_reader(sc, m1.outputs[0], "Mul")
        if m2 is None:
            return None
        if o is x:  # (x * a) * 0.5
            ok = is_value(sc, m2, 0.5) is m1.outputs[0]
        else:  # (a * 0.5) * x
            ok = is_value(sc, m1, 0.5) is a and other_input(m2, m1.outputs[0]) is x
        return (m2.outputs[0], [m1, m2], [m1 if o is x else m2]) if ok else None
    half = made_by(sc, o, "Mul")  # (x * 0.5) * a
    if half is not None and is_value(sc, half, 0.5) is x and read_only_by(sc, o, [m1]):
        return m1.outputs[0], [half, m1], [half]
    return None


def match_gelu(sc: Scope, anchor: gs.Node) -> _Match | None:
    """The GELU around an Erf or Tanh node, if every intermediate feeds only the next step."""
    if anchor.op == "Erf":
        found = _erf_argument(sc, anchor)
        head = None if found is None else (found[0], [found[1]], [found[1]])
    else:
        head = _tanh_argument(sc, anchor)
    if head is None:
        return None
    x, nodes, readers = head
    plus = only_reader(sc, anchor.outputs[0], "Add")
    if plus is None or is_value(sc, plus, 1.0) is not anchor.outputs[0]:
        return None
    tail = _product(sc, x, plus.outputs[0])
    if tail is None:
        return None
    out, more, more_readers = tail
    return _Match(x, out, [*nodes, anchor, plus, *more], [*readers, *more_readers], anchor.op == "Tanh")


def _bias(sc: Scope, m: _Match) -> tuple[gs.Tensor, gs.Tensor, gs.Node] | None:
    """(y, bias, the Add) when x = y + bias, bias a float32 constant over y's last axis, x read by the GELU only."""
    add = made_by(sc, m.x, "Add")
    if add is None or not read_only_by(sc, m.x, m.readers):
        return None
    for k in (0, 1):
        y, bias = add.inputs[1 - k], f32_constant(add.inputs[k])
        if bias is not None and not is_constant(y) and bias.shape == (last_dim(sc, y),):
            return y, add.inputs[k], add
    return None


def fuse_gelu(ft: FusionTarget, sc: Scope, anchor: gs.Node) -> str | None:
    """Replace the GELU around Erf/Tanh `anchor`; the counter name of what it became, or None."""
    m = match_gelu(sc, anchor)
    if m is None:
        return None
    base = anchor.name or "Gelu"
    if ft.contrib:
        biased = _bias(sc, m)
        op = "FastGelu" if m.tanh else "Gelu"
        inputs: list = [m.x]
        if biased is not None:
            y, bias, add = biased
            op = "FastGelu" if m.tanh else "BiasGelu"
            inputs = [y, bias]
            m.nodes.append(add)
        for node in m.nodes:
            detach(node)
        ft.contrib_node(sc, op, base, inputs, [m.out])
        return "bias_gelu_fused" if biased is not None else "gelu_fused"
    if not ft.has("Gelu"):
        ft.leave(
            sc,
            anchor,
            "gelu_left_decomposed",
            f"decomposed GELU left: target {ft.ctx.target} takes no com.microsoft ops and the standard Gelu "
            f"needs opset >= 20, the model has {ft.opset}",
        )
        return None
    for node in m.nodes:
        detach(node)
    ft.new_node(sc, "Gelu", base, [m.x], [m.out], approximate="tanh" if m.tanh else "none")
    return "gelu_fused"
