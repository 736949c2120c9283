"""The additive mask of a self-attention, recognized as a key-padding mask computed from a 2-D input.

The mask term added to the scores is recognized by what it computes, not by its op list: the chain
from a [batch, sequence] graph input (Unsqueeze, Cast, Identity, Sub, Mul, Add, Div, Equal, Not,
Where, each with scalar constants) must unsqueeze it to [batch, 1, 1, keys], and, evaluated at a
kept (1) and a padded (0) position, give 0 and a large negative. Attention masks hold 0 and 1, so
the fused op's raw-mask form (nonzero keeps a key) computes the same. Causal masks, [B, S, S] or
4-D masks, query masks and masks computed from anything but a 2-D input are refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, is_constant, producer
from onnxopt.passes.fuse.scope import Scope

#: A mask term at a padded position must be at most this (0 at a kept one) to count as key padding.
MASK_MIN_NEGATIVE = -1e4

_ELEMENTWISE = ("Unsqueeze", "Cast", "Identity", "Not", "Sub", "Mul", "Add", "Div", "Equal", "Where")


class _NotPadding(Exception):
    """The mask is no key-padding mask; the message says why."""


def padding_mask(sc: Scope, term: gs.Tensor, x: gs.Tensor) -> tuple[gs.Tensor, float] | str:
    """(2-D mask input, value at padded keys) of the mask term `term` added to the scores of the
    attention over `x` [batch, sequence, hidden]; else why it is no key-padding mask."""
    try:
        return _padding_mask(sc, term, x)
    except _NotPadding as miss:
        return str(miss)


def _padding_mask(sc: Scope, term: gs.Tensor, x: gs.Tensor) -> tuple[gs.Tensor, float]:
    """(mask input, value at padded keys) of an additive mask term computed from a 0/1 key mask."""
    raw, chain = _source(sc, term)
    dtype = _check_input(sc, raw, x)
    if _broadcast_dims(chain) != ["b", 1, 1, "s"]:
        raise _NotPadding(f"the mask {term.name} is not [batch, 1, 1, keys]: causal or of another form")
    kept, padded = (_evaluate(chain, np.asarray(v).astype(dtype)) for v in (1, 0))
    if kept.dtype.kind != "f" or float(kept) != 0.0 or not float(padded) <= MASK_MIN_NEGATIVE:
        raise _NotPadding(f"the mask {term.name} is not 0 at kept and a large negative at padded keys")
    return raw, max(float(padded), float(np.finfo(np.float32).min))


def _source(sc: Scope, term: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
    """The tensor the elementwise chain computing `term` starts from, and that chain, in order."""
    chain: list[gs.Node] = []
    raw = term
    p = producer(raw)
    while p is not None and sc.owns(p) and p.op in _ELEMENTWISE:
        raw = _chain_input(p)
        chain.append(p)
        p = producer(raw)
    chain.reverse()
    return raw, chain


def _check_input(sc: Scope, raw: gs.Tensor, x: gs.Tensor) -> np.dtype:
    """The element type of `raw`, checked to be a 2-D graph input that can be x's [batch, sequence]."""
    if not any(raw is i for i in list(sc.graph.inputs) + list(sc.root.inputs)) or sc.rank(raw) != 2:
        raise _NotPadding(f"the mask {raw.name} is not computed from a 2-D [batch, sequence] mask input")
    info, xinfo = sc.shapes.get(raw.name), sc.shapes.get(x.name)
    dims = info.shape if info is not None and info.shape is not None else (None, None)
    xdims = xinfo.shape if xinfo is not None and xinfo.shape is not None else (None, None, None)
    if len(dims) != 2 or any(_mismatch(d, xd) for d, xd in zip(dims, xdims[:2])):
        raise _NotPadding(f"the mask {raw.name} of shape {list(dims)} does not match the input's [batch, sequence]")
    if info is not None and info.dtype is not None:
        return info.dtype
    return np.dtype(raw.dtype or np.int64)


def _mismatch(d: object, xd: object) -> bool:
    """Whether a mask axis of size `d` cannot be the input's axis `xd` (a size 1 would broadcast)."""
    if isinstance(d, int) and isinstance(xd, int):
        return d != xd
    return d == 1


def _chain_input(node: gs.Node) -> gs.Tensor:
    """The one computed input of an elementwise mask op (its other inputs are scalar constants)."""
    if node.op == "Unsqueeze":
        return node.inputs[0]
    computed = [i for i, t in enumerate(node.inputs) if not is_constant(t)]
    if len(computed) != 1 or (node.op == "Where" and computed != [0]):
        raise _NotPadding(f"{node.op} {node.name} in the mask mixes two computed tensors")
    for t in node.inputs:
        v = constant_value(t) if is_constant(t) else None
        if v is not None and v.size != 1:
            raise _NotPadding(f"{node.op} {node.name} in the mask applies a constant that is not one value")
    return node.inputs[computed[0]]


def _broadcast_dims(chain: list[gs.Node]) -> list[object]:
    """The axes of the mask term built by `chain` from a ["b", "s"] mask (1 where Unsqueeze adds one)."""
    dims: list[object] = ["b", "s"]
    for node in chain:
        if node.op == "Unsqueeze":
            axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
            if axes is None:
                raise _NotPadding(f"Unsqueeze {node.name} has no constant axes")
            rank = len(dims) + len(np.atleast_1d(axes))
            for a in sorted(int(a) % rank for a in np.atleast_1d(axes)):
                dims.insert(a, 1)
        else:
            ranks = [v.ndim for t in node.inputs if (v := constant_value(t)) is not None]
            if any(r > len(dims) for r in ranks):
                raise _NotPadding(f"{node.op} {node.name} in the mask adds axes")
    return dims


def _evaluate(chain: list[gs.Node], value: np.ndarray) -> np.ndarray:
    """The value the mask `chain` computes from one raw mask value."""
    for node in chain:
        if node.op not in ("Unsqueeze", "Identity"):
            args = [np.asarray(constant_value(t)).reshape(()) if is_constant(t) else value for t in node.inputs]
            value = _apply(node, args)
    return value


def _apply(node: gs.Node, args: list[np.ndarray]) -> np.ndarray:
    """One elementwise mask op on scalars."""
    op = node.op
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if op == "Not":
        return np.logical_not(args[0])
    if op == "Where":
        return np.where(args[0], args[1], args[2])
    if op == "Div" and args[0].dtype.kind != "f":
        raise _NotPadding(f"integer Div {node.name} in the mask")
    fn = {"Sub": np.subtract, "Mul": np.multiply, "Add": np.add, "Div": np.divide, "Equal": np.equal}[op]
    with np.errstate(all="ignore"):
        return np.asarray(fn(args[0], args[1]))
