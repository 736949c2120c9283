"""Abstract values of shape arithmetic: what `Shape`, `Gather`, `Concat`... compute, dim by dim.

Each small integer tensor on a shape path gets a value: a scalar or a 1-D list
whose entries are ints (known), or `Sym` (a dynamic dimension named by shape
inference: known to be that input's axis, but not a number). This is what lets
`Reshape(x[N,3,8,8], Concat(Shape(x)[0], 3*8*8))` become `Reshape(x, [-1, 192])`
without freezing N. Only dimensions that inference reports as numbers are ever
turned into constants.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value
from onnxopt.shapes import TensorInfo


@dataclass(frozen=True)
class Sym:
    """An unknown dimension (dynamic axis or unknown arithmetic result)."""

    label: str


@dataclass(frozen=True)
class ShapeValue:
    """Abstract value of an int tensor of rank 0 (scalar) or 1."""

    items: tuple[int | Sym, ...]
    scalar: bool = False

    @property
    def known(self) -> bool:
        return all(isinstance(v, int) for v in self.items)

    def array(self, dtype: np.dtype) -> np.ndarray:
        arr = np.array(self.items, dtype=dtype)
        return arr.reshape(()) if self.scalar else arr


_MAX_LEN = 64
_unknown_counter = [0]


def _unknown() -> Sym:
    _unknown_counter[0] += 1
    return Sym(f"?{_unknown_counter[0]}")


def _const_value(t: gs.Tensor) -> ShapeValue | None:
    if isinstance(t, gs.Constant) and (np.dtype(t.dtype).kind not in "iu" or len(t.shape) > 1
                                       or int(np.prod(t.shape)) > _MAX_LEN):
        return None  # decided from metadata: a weight is never loaded just to be rejected
    v = constant_value(t)
    if v is None or v.dtype.kind not in "iu" or v.ndim > 1 or v.size > _MAX_LEN:
        return None
    return ShapeValue(tuple(int(x) for x in v.reshape(-1)), scalar=v.ndim == 0)


def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _binary(op: str, a: int | Sym, b: int | Sym) -> int | Sym:
    if isinstance(a, int) and isinstance(b, int):
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        if op == "Mul":
            return a * b
        if op == "Div" and b != 0:
            return int(np.floor_divide(a, b)) if (a < 0) != (b < 0) else a // b
        if op == "Max":
            return max(a, b)
        if op == "Min":
            return min(a, b)
        return _unknown()
    if op == "Mul" and (a == 1 or b == 1):
        return b if a == 1 else a
    if op in ("Add", "Sub") and b == 0:
        return a
    if op == "Add" and a == 0:
        return b
    if op == "Div" and b == 1:
        return a
    return _unknown()


def evaluate(nodes: list[gs.Node], info: dict[str, TensorInfo]) -> dict[int, ShapeValue]:
    """Abstract values for shape-path tensors of `nodes` (topologically sorted), keyed by id(tensor)."""
    values: dict[int, ShapeValue] = {}

    def val(t: gs.Tensor) -> ShapeValue | None:
        if id(t) in values:
            return values[id(t)]
        v = _const_value(t)
        if v is not None:
            values[id(t)] = v
        return v

    for node in nodes:
        try:
            out = _evaluate_node(node, val, info)
        except (IndexError, ValueError, TypeError):
            out = None
        if out is not None and node.outputs and len(out.items) <= _MAX_LEN:
            values[id(node.outputs[0])] = out
    return values


def _evaluate_node(node: gs.Node, val, info: dict[str, TensorInfo]) -> ShapeValue | None:
    op = node.op
    ins = node.inputs
    if op == "Shape":
        ti = info.get(ins[0].name)
        if ti is None or ti.shape is None:
            return None
        dims = [d if isinstance(d, int) else (Sym(d) if isinstance(d, str) else _unknown()) for d in ti.shape]
        rank = len(dims)
        start, end = _attr(node, "start", 0), _attr(node, "end", rank)
        start = max(0, min(rank, start + rank if start < 0 else start))
        end = max(0, min(rank, end + rank if end < 0 else end))
        return ShapeValue(tuple(dims[start:end]))
    if op == "Size":
        ti = info.get(ins[0].name)
        if ti is not None and ti.static:
            return ShapeValue((int(np.prod(ti.shape)),), scalar=True)
        return None
    args = [val(t) if t.name else None for t in ins]
    if op in ("Identity", "Cast"):
        if op == "Cast" and _attr(node, "to") not in (6, 7):  # int32, int64
            return None
        return args[0]
    if op == "Gather":
        data, idx = args[0], args[1]
        if data is None or idx is None or not idx.known or data.scalar or _attr(node, "axis", 0) != 0:
            return None
        n = len(data.items)
        picked = tuple(data.items[i + n if i < 0 else i] for i in idx.items)
        return ShapeValue(picked, scalar=idx.scalar)
    if op == "Concat":
        if any(a is None or a.scalar for a in args):
            return None
        return ShapeValue(tuple(x for a in args for x in a.items))
    if op == "Unsqueeze":
        a = args[0]
        if a is not None and a.scalar:
            return ShapeValue(a.items, scalar=False)
        return None
    if op == "Squeeze":
        a = args[0]
        if a is not None and not a.scalar and len(a.items) == 1:
            return ShapeValue(a.items, scalar=True)
        return None
    if op == "Slice":
        data = args[0]
        if data is None or data.scalar or any(a is None or not a.known for a in args[1:] if a is not None) \
                or len(args) < 3 or args[1] is None or args[2] is None:
            return None
        if len(args) > 3 and args[3] is not None and args[3].items not in ((0,), (-1,)):
            return None
        start, end = args[1].items[0], args[2].items[0]
        step = args[4].items[0] if len(args) > 4 and args[4] is not None else 1
        return ShapeValue(tuple(data.items[slice(start, end, step)]))
    if op in ("Add", "Sub", "Mul", "Div", "Max", "Min") and len(args) == 2:
        a, b = args
        if a is None or b is None:
            return None
        la, lb = len(a.items), len(b.items)
        if la != lb and 1 not in (la, lb):
            return None
        n = max(la, lb)
        ai = a.items * n if la == 1 else a.items
        bi = b.items * n if lb == 1 else b.items
        return ShapeValue(tuple(_binary(op, x, y) for x, y in zip(ai, bi)), scalar=a.scalar and b.scalar)
    return None
