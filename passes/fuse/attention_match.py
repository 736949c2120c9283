"""Recognize decomposed multi-head self-attention (BERT-style exports) around its Softmax.

The form matched, from one input X [B, S, Hin] (N heads of size D, Dv for V):

    Q = X @ Wq (+ bq) -> Reshape [0, 0, N, D]  -> Transpose [0, 2, 1, 3]
    K = X @ Wk (+ bk) -> Reshape [0, 0, N, D]  -> Transpose [0, 2, 3, 1]  (or Transposes composing to it)
    V = X @ Wv (+ bv) -> Reshape [0, 0, N, Dv] -> Transpose [0, 2, 1, 3]
    scores = MatMul(Q, K)          scalar Mul/Div on Q, on K or on the scores: one scale in all
    (+ mask term)                   elementwise in a [B, S] 0/1 mask input, unsqueezed to [B, 1, 1, S]
    Softmax(axis=-1) -> MatMul(., V) -> Transpose [0, 2, 1, 3] -> Reshape [0, 0, N * Dv]

The mask term is recognized in `attention_mask` (a key-padding mask computed from a 2-D mask input;
every other mask is left alone). Every intermediate tensor must be read by the next node only and
be no graph output; weights and biases must be constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, is_constant, producer
from onnxopt.passes.fuse.attention_mask import padding_mask
from onnxopt.passes.fuse.scope import Scope, sole_consumer

_Q_PERM = (0, 2, 1, 3)
_K_PERM = (0, 2, 3, 1)


class _Miss(Exception):
    """The candidate is not the pattern; the message says why."""


@dataclass
class Projection:
    """One of Q, K, V: X @ weight + bias, split into `heads` heads of `head_size`."""

    x: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray
    heads: int
    head_size: int
    scale: float = 1.0


@dataclass
class AttentionMatch:
    """A matched self-attention: what the fused op needs and the nodes it replaces."""

    x: gs.Tensor
    q: Projection
    k: Projection
    v: Projection
    scale: float
    output: gs.Tensor
    mask: gs.Tensor | None = None
    mask_filter: float = 0.0
    nodes: list[gs.Node] = field(default_factory=list)

    @property
    def default_scale(self) -> bool:
        """Whether the scale is the fused op's default, 1 / sqrt(head size)."""
        return math.isclose(self.scale, 1.0 / math.sqrt(self.q.head_size), rel_tol=1e-6)


def match_attention(sc: Scope, softmax: gs.Node) -> AttentionMatch | str | None:
    """The self-attention around `softmax`; a reason when it looks like attention but does not fit;
    None when it is no attention Softmax at all (its output feeds no MatMul)."""
    out = softmax.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "MatMul" or out.outputs[0].inputs[0] is not out:
        return None
    try:
        return _match(sc, softmax)
    except _Miss as miss:
        return str(miss)


def _match(sc: Scope, softmax: gs.Node) -> AttentionMatch:
    opset = sc.root.opset or 13
    axis = int(softmax.attrs.get("axis", -1 if opset >= 13 else 1))
    if axis not in (-1, 3):
        raise _Miss(f"Softmax over axis {axis}, not the key axis")
    nodes: list[gs.Node] = [softmax]
    scores, mask_term = _split_mask(sc, softmax.inputs[0], nodes)
    scale, qk = _peel_scales(sc, scores, nodes)
    if qk.op != "MatMul":
        raise _Miss(f"the scores come from {qk.op}, not MatMul(Q, K)")
    q = _projection(sc, qk.inputs[0], _Q_PERM, nodes, scalable=True)
    k = _projection(sc, qk.inputs[1], _K_PERM, nodes, scalable=True)
    pv = _consumer(sc, softmax.outputs[0], nodes)
    v = _projection(sc, pv.inputs[1], _Q_PERM, nodes, scalable=False)
    output = _merge_heads(sc, pv.outputs[0], v, nodes)
    _check_projections(sc, q, k, v)
    m = AttentionMatch(q.x, q, k, v, scale * q.scale * k.scale, output, nodes=nodes)
    if m.scale <= 0 or not math.isfinite(m.scale):
        raise _Miss(f"scale {m.scale} is not a positive number")
    if mask_term is not None:
        found = padding_mask(sc, mask_term, q.x)
        if isinstance(found, str):
            raise _Miss(found)
        m.mask, m.mask_filter = found
    if len({id(n) for n in nodes}) != len(nodes):
        raise _Miss("the same node takes two roles in the pattern")
    return m


def _check_projections(sc: Scope, q: Projection, k: Projection, v: Projection) -> None:
    """Q, K and V project one rank-3 input with weights of one type into the same heads."""
    if not (q.x is k.x is v.x):
        raise _Miss("cross-attention: Q, K and V are projections of different tensors")
    if sc.rank(q.x) != 3:
        raise _Miss(f"the input {q.x.name} is not known to be of rank 3 [batch, sequence, hidden]")
    if (q.heads, q.head_size) != (k.heads, k.head_size) or v.heads != q.heads:
        raise _Miss("Q, K and V are split into different heads")
    shapes = {w.weight.shape[0] for w in (q, k, v)}
    dtypes = {w.weight.dtype for w in (q, k, v)} | {w.bias.dtype for w in (q, k, v)}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise _Miss("the Q, K and V weights differ in input size or type")


def _step(sc: Scope, t: gs.Tensor, nodes: list[gs.Node]) -> gs.Node:
    """The producer of intermediate `t`, which only the node below reads; it joins `nodes`."""
    p = producer(t)
    if p is None or not sc.owns(p):
        raise _Miss(f"{t.name} is no intermediate result of this graph")
    if sole_consumer(sc, t) is None:
        raise _Miss(f"{t.name} is read by other nodes too or is a graph output")
    nodes.append(p)
    return p


def _consumer(sc: Scope, t: gs.Tensor, nodes: list[gs.Node]) -> gs.Node:
    """The only consumer of intermediate `t`; it joins `nodes`."""
    c = sole_consumer(sc, t)
    if c is None:
        raise _Miss(f"{t.name} is read by other nodes too or is a graph output")
    nodes.append(c)
    return c


def _scalar_factor(node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """(operand, factor) of Mul(x, c) / Mul(c, x) / Div(x, c) by one float constant, else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    order = ((0, 1), (1, 0)) if node.op == "Mul" else ((0, 1),)
    for xi, ci in order:
        x, c = node.inputs[xi], node.inputs[ci]
        if is_constant(x) or not is_constant(c):
            continue
        v = constant_value(c)
        if v is None or v.size != 1 or v.ndim > 3 or v.dtype.kind != "f":
            return None
        f = float(v.reshape(-1)[0])
        if node.op == "Div":
            return (x, 1.0 / f) if f != 0 else None
        return x, f
    return None


def _peel_scales(sc: Scope, t: gs.Tensor, nodes: list[gs.Node]) -> tuple[float, gs.Node]:
    """Walk up from `t` through scalar Mul/Div: (their product, the first other producer)."""
    scale = 1.0
    while True:
        p = _step(sc, t, nodes)
        found = _scalar_factor(p)
        if found is None:
            return scale, p
        t, f = found
        scale *= f


def _split_mask(sc: Scope, s: gs.Tensor, nodes: list[gs.Node]) -> tuple[gs.Tensor, gs.Tensor | None]:
    """(scores, mask term) of the Softmax input: Add(scores, mask) in either order, or the scores alone."""
    p = producer(s)
    if p is None or p.op != "Add" or len(p.inputs) != 2:
        return s, None
    for si, mi in ((0, 1), (1, 0)):
        if _reaches_matmul(sc, p.inputs[si]) and not _reaches_matmul(sc, p.inputs[mi]):
            _step(sc, s, nodes)
            return p.inputs[si], p.inputs[mi]
    raise _Miss("the Softmax input is an Add of which no single operand is the scores")


def _reaches_matmul(sc: Scope, t: gs.Tensor) -> bool:
    """Whether `t` is a MatMul of two computed tensors, maybe through scalar Mul/Div."""
    p = producer(t)
    while p is not None and sc.owns(p):
        if p.op == "MatMul":
            return not is_constant(p.inputs[0]) and not is_constant(p.inputs[1])
        found = _scalar_factor(p)
        if found is None:
            return False
        p = producer(found[0])
    return False


def _compose_up(perm: tuple[int, ...], node: gs.Node) -> tuple[int, ...]:
    """The permutation from the tensor above Transpose `node` to the tensor `perm` was measured at."""
    p = node.attrs.get("perm")
    p = tuple(int(i) for i in p) if p is not None else tuple(reversed(range(len(perm))))
    if len(p) != len(perm):
        raise _Miss(f"Transpose {node.name} is not of rank 4")
    return tuple(p[i] for i in perm)


def _projection(sc: Scope, t: gs.Tensor, want: tuple[int, ...], nodes: list[gs.Node], scalable: bool) -> Projection:
    """Walk up from the per-head tensor `t` to X @ W + b: Transposes composing to `want`, a Reshape
    into heads, scalar factors (where `scalable`: Q and K only), the bias Add and the MatMul."""
    perm: tuple[int, ...] = (0, 1, 2, 3)
    scale = 1.0
    p = _step(sc, t, nodes)
    while p.op != "Reshape":
        found = _scalar_factor(p) if scalable else None
        if p.op == "Transpose":
            perm, t = _compose_up(perm, p), p.inputs[0]
        elif found is not None:
            t, scale = found[0], scale * found[1]
        else:
            raise _Miss(f"{p.op} {p.name} sits between a projection and the attention MatMuls")
        p = _step(sc, t, nodes)
    if perm != want:
        raise _Miss(f"the heads are transposed by {list(perm)}, not {list(want)}")
    reshape = p
    t = reshape.inputs[0]
    p = _step(sc, t, nodes)
    found = _scalar_factor(p) if scalable else None
    while found is not None:
        t, scale = found[0], scale * found[1]
        p = _step(sc, t, nodes)
        found = _scalar_factor(p)
    bias = None
    if p.op == "Add":
        t, bias = _bias_operand(p)
        p = _step(sc, t, nodes)
    if p.op != "MatMul" or is_constant(p.inputs[0]) or not is_constant(p.inputs[1]):
        raise _Miss(f"{p.op} {p.name} is no MatMul of the input by a constant weight")
    w = constant_value(p.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        raise _Miss(f"the weight of {p.name} is not a 2-D float constant")
    hidden = w.shape[1]
    bias_vec = _bias_vector(bias, hidden, w.dtype, p.name)
    heads, head_size = _heads(sc, reshape, hidden)
    return Projection(p.inputs[0], w, bias_vec, heads, head_size, scale)


def _bias_operand(add: gs.Node) -> tuple[gs.Tensor, np.ndarray]:
    """(computed operand, constant value) of the bias Add of a projection."""
    a, b = add.inputs[0], add.inputs[1]
    if is_constant(a) != is_constant(b):
        x, c = (b, a) if is_constant(a) else (a, b)
        v = constant_value(c)
        if v is not None:
            return x, v
    raise _Miss(f"Add {add.name} adds no constant bias")


def _bias_vector(bias: np.ndarray | None, hidden: int, dtype: np.dtype, name: str) -> np.ndarray:
    """The projection bias as a vector of `hidden` values (zeros without one)."""
    if bias is None:
        return np.zeros(hidden, dtype=dtype)
    if bias.dtype != dtype or bias.ndim > 3 or (bias.size != 1 and bias.shape[-1:] != (hidden,)):
        raise _Miss(f"the bias after {name} is not one value per output channel")
    if bias.size not in (1, hidden):
        raise _Miss(f"the bias after {name} varies along more than the channel axis")
    return np.broadcast_to(bias.reshape(-1), (hidden,)).astype(dtype)


def _heads(sc: Scope, reshape: gs.Node, hidden: int) -> tuple[int, int]:
    """(heads, head size) from a Reshape [B, S, hidden] -> [B, S, N, D] with a constant target."""
    target = _reshape_target(sc, reshape, 4)
    n, d = target[2], target[3]
    if n == -1 and d > 0 and hidden % d == 0:
        n = hidden // d
    elif d == -1 and n > 0 and hidden % n == 0:
        d = hidden // n
    if n <= 0 or d <= 0 or n * d != hidden:
        raise _Miss(f"{reshape.name}: heads {target[2:]} do not split the hidden size {hidden}")
    return n, d


def _reshape_target(sc: Scope, reshape: gs.Node, rank: int) -> list[int]:
    """The constant target of `reshape`, checked to keep the batch and sequence axes."""
    v = constant_value(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    if v is None or v.ndim != 1 or v.size != rank:
        raise _Miss(f"{reshape.name} has no constant target of {rank} values")
    target = [int(i) for i in v]
    info = sc.shapes.get(reshape.inputs[0].name)
    dims = tuple(info.shape) if info is not None and info.shape is not None else ()
    dims = dims + (None,) * max(0, 2 - len(dims))
    keep_zero = not int(reshape.attrs.get("allowzero", 0))
    for i in (0, 1):
        ok = target[i] == -1 or (target[i] == 0 and keep_zero) or (target[i] > 0 and target[i] == dims[i])
        if not ok:
            raise _Miss(f"{reshape.name} does not keep the batch and sequence axes: target {target}")
    if target.count(-1) > 1:
        raise _Miss(f"{reshape.name}: target {target} leaves the head split open")
    return target


def _merge_heads(sc: Scope, t: gs.Tensor, v: Projection, nodes: list[gs.Node]) -> gs.Tensor:
    """Walk down from the per-head result `t` through Transposes composing to [0, 2, 1, 3] and the
    Reshape back to [B, S, N * Dv]; that Reshape's output."""
    perm: tuple[int, ...] = (0, 1, 2, 3)
    c = _consumer(sc, t, nodes)
    while c.op == "Transpose":
        p = c.attrs.get("perm")
        p = tuple(int(i) for i in p) if p is not None else (3, 2, 1, 0)
        perm = tuple(perm[i] for i in p)
        c = _consumer(sc, c.outputs[0], nodes)
    if perm != _Q_PERM or c.op != "Reshape":
        raise _Miss("the heads are not transposed back and merged by one Reshape")
    hidden = v.heads * v.head_size
    target = _reshape_target(sc, c, 3)
    if target[2] not in (hidden, -1) or (target[2] == -1 and -1 in target[:2]):
        raise _Miss(f"{c.name} does not merge the heads into {hidden} channels: target {target}")
    return c.outputs[0]
