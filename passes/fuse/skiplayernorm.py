"""SkipLayerNormalization (onnxruntime's com.microsoft op; targets cpu and cuda only):

    s = Add(a, b) [+ bias]  ->  LayerNormalization(s, gamma, beta, axis=-1)

becomes SkipLayerNormalization(a, b, gamma, beta, bias, epsilon) with its fourth output giving s when
something else reads s (the residual). The bias is absorbed from Add(y, bias) feeding the sum (y
then takes its place) or from Add(Add(a, b), bias). onnxruntime wants a and b of the same shape, of
rank 2 or 3, and gamma, beta and bias 1-D of the hidden size: all are checked (shapes through
`FusionTarget.same_shape`), as is that the LayerNormalization's mean and inverse deviation
outputs are unused.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.ir.graph import detach, is_constant
from onnxopt.passes.fuse.matching import (
    FusionTarget,
    f32_constant,
    last_dim,
    made_by,
    read_only_by,
)
from onnxopt.passes.fuse.scope import Scope


def _bias_of(sc: Scope, t: gs.Tensor, reader: gs.Node, hidden: int) -> tuple[gs.Tensor, gs.Tensor, gs.Node] | None:
    """(y, bias, the Add) when `t` = Add(y, bias [hidden]) is read by `reader` only."""
    add = made_by(sc, t, "Add")
    if add is None or not read_only_by(sc, t, [reader]):
        return None
    for k in (0, 1):
        bias = f32_constant(add.inputs[k])
        if bias is not None and bias.shape == (hidden,) and not is_constant(add.inputs[1 - k]):
            return add.inputs[1 - k], add.inputs[k], add
    return None


def _operands(sc: Scope, add: gs.Node, hidden: int) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None, list] | None:
    """(a, b, bias or None, the extra Add absorbed) of the sum `add` computes."""
    p, q = add.inputs
    if is_constant(p) or is_constant(q):  # Add(Add(a, b), bias)
        inner_t, c = (q, p) if is_constant(p) else (p, q)
        bias = f32_constant(c)
        inner = made_by(sc, inner_t, "Add")
        if bias is None or bias.shape != (hidden,) or inner is None or not read_only_by(sc, inner_t, [add]):
            return None
        a, b = inner.inputs
        return None if is_constant(a) or is_constant(b) else (a, b, c, [inner])
    for y, other in ((p, q), (q, p)):
        found = _bias_of(sc, y, add, hidden)
        if found is not None:
            return found[0], other, found[1], [found[2]]
    return p, q, None, []


def _ln_parts(sc: Scope, ln: gs.Node) -> tuple[int, gs.Tensor, gs.Tensor | None] | None:
    """(hidden size, gamma, beta or None) of a LayerNormalization over the last axis that onnxruntime's
    SkipLayerNormalization can take over."""
    x = ln.inputs[0]
    rank, hidden = sc.rank(x), last_dim(sc, x)
    if rank not in (2, 3) or hidden is None or len(ln.inputs) < 2:
        return None
    if ln.attrs.get("axis", -1) not in (-1, rank - 1) or ln.attrs.get("stash_type", 1) != 1:
        return None
    if any(not read_only_by(sc, o, []) for o in ln.outputs[1:] if o.name):
        return None  # its mean or inverse deviation is read
    gamma = ln.inputs[1]
    beta = ln.inputs[2] if len(ln.inputs) > 2 and ln.inputs[2].name else None
    for t in (gamma, beta):
        v = f32_constant(t) if t is not None else None
        if t is not None and (v is None or v.shape != (hidden,)):
            return None
    return hidden, gamma, beta


def fuse_skip_layernorm(ft: FusionTarget, sc: Scope, ln: gs.Node) -> bool:
    """Replace LayerNormalization `ln` and the residual sum before it; whether it did."""
    parts = _ln_parts(sc, ln)
    add = made_by(sc, ln.inputs[0], "Add") if parts is not None else None
    if add is None or parts is None:
        return False
    hidden, gamma, beta = parts
    found = _operands(sc, add, hidden)
    if found is None:
        return False
    a, b, bias, extra = found
    if sc.rank(a) not in (2, 3) or last_dim(sc, a) != hidden or not ft.same_shape(sc, a, b):
        return False
    s = ln.inputs[0]
    residual = not read_only_by(sc, s, [ln])
    y = ln.outputs[0]
    inputs = [a, b, gamma, beta or gs.Variable.empty()] + ([bias] if bias is not None else [])
    if beta is None and bias is None:
        inputs.pop()
    outputs = [y, gs.Variable.empty(), gs.Variable.empty(), s] if residual else [y]
    eps = float(ln.attrs.get("epsilon", 1e-5))
    for node in (ln, add, *extra):
        detach(node)
    ft.contrib_node(sc, "SkipLayerNormalization", ln.name or "LayerNorm", inputs, outputs, epsilon=eps)
    return True
