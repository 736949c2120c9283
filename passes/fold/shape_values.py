"""Abstract values of shape arithmetic: what `Shape`, `Gather`, `Concat`... compute, dim by dim.

Each small integer tensor on a shape path gets a value: a scalar or a 1-D list
whose entries are ints (known), or `Sym` (a dynamic dimension named by shape
inference: known to be that input's axis, but not a number). This is what lets
`Reshape(x[N,3,8,8], Concat(Shape(x)[0], 3*8*8))` become `Reshape(x, [-1, 192])`
without freezing N. Only dimensions that inference reports as numbers are ever
turned into constants.

Every value carries its ONNX element type (int64 from `Shape`, whatever a
constant or `Cast` says otherwise), and known entries are computed with ONNX
semantics for that type (`onnxopt.kernels.int_arith`: wrap-around, truncating
`Div`, `Mod` with its `fmod` attribute), so a folded value is what the runtime
would have computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.ir.graph import constant_value
from onnxopt.ir.gs_compat import LazyValues, stored_values
from onnxopt.kernels import int_arith

_INT64 = np.dtype(np.int64)
_INTEGER_TYPES = {
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT32,
    TensorProto.UINT32,
    TensorProto.INT64,
    TensorProto.UINT64,
}


@dataclass(frozen=True)
class Sym:
    """An unknown dimension (dynamic axis or unknown arithmetic result)."""

    label: str


@dataclass(frozen=True)
class ShapeValue:
    """Abstract value of an int tensor of rank 0 (scalar) or 1."""

    items: tuple[int | Sym, ...]
    scalar: bool = False
    dtype: np.dtype = _INT64

    @property
    def known(self) -> bool:
        return all(isinstance(v, int) for v in self.items)

    def array(self) -> np.ndarray:
        """The known value as an array of its own element type."""
        arr = np.array(self.items, dtype=self.dtype)
        return arr.reshape(()) if self.scalar else arr


_MAX_LEN = 64
_unknown_counter = [0]


def _unknown() -> Sym:
    """A fresh symbol for a value nothing is known about."""
    _unknown_counter[0] += 1
    return Sym(f"?{_unknown_counter[0]}")


def _const_value(t: gs.Tensor) -> ShapeValue | None:
    """The value of a small 1-D or scalar integer constant (or `Constant` node output), else None."""
    c = t if isinstance(t, gs.Constant) else None
    p = t.inputs[0] if c is None and t.inputs else None
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        c = p.attrs["value"]
    if c is None:
        return None
    lazy = stored_values(c)
    if isinstance(lazy, LazyValues) and lazy.tensor.data_type not in _INTEGER_TYPES:
        return None  # int4 and the like: gs would widen them, losing their wrap-around width
    try:
        dtype = np.dtype(c.dtype)
    except TypeError:
        return None  # an ONNX type numpy has no dtype for: not shape arithmetic
    if not int_arith.is_integer(dtype) or len(c.shape) > 1 or int_arith.product(c.shape) > _MAX_LEN:
        return None  # decided from metadata: a weight is never loaded just to be rejected
    v = np.asarray(constant_value(c))
    if not int_arith.is_integer(v.dtype) or v.ndim > 1 or v.size > _MAX_LEN:
        return None
    return ShapeValue(tuple(int(x) for x in v.reshape(-1)), scalar=v.ndim == 0, dtype=np.dtype(v.dtype))


def _attr(node: gs.Node, name: str, default=None):
    """Attribute `name` of `node`, or `default`."""
    return node.attrs.get(name, default)


def _binary(op: str, a: int | Sym, b: int | Sym, dtype: np.dtype, fmod: int = 0) -> int | Sym:
    """One entry of an elementwise op: exact for two ints, identities (x*1, x+0, x/1) for a symbol."""
    if isinstance(a, int) and isinstance(b, int):
        r = int_arith.binary(op, a, b, dtype, fmod)
        return _unknown() if r is None else r
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


def _evaluate_node(
    node: gs.Node, val: Callable[[gs.Tensor], ShapeValue | None], info: dict[str, TensorInfo]
) -> ShapeValue | None:
    """The abstract value of `node`'s first output (None: not shape arithmetic, or unknown)."""
    from_shape = _FROM_SHAPES.get(node.op)
    if from_shape is not None:
        return from_shape(node, info.get(node.inputs[0].name))
    args = [val(t) if t.name else None for t in node.inputs]  # every node: constants it reads get values
    from_args = _FROM_ARGS.get(node.op)
    return None if from_args is None else from_args(node, args)


def _shape(node: gs.Node, ti: TensorInfo | None) -> ShapeValue | None:
    """`Shape` (with its start/end): the inferred dims, dynamic ones as symbols."""
    if ti is None or ti.shape is None:
        return None
    dims = [d if isinstance(d, int) else (Sym(d) if isinstance(d, str) else _unknown()) for d in ti.shape]
    rank = len(dims)
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    start = max(0, min(rank, start + rank if start < 0 else start))
    end = max(0, min(rank, end + rank if end < 0 else end))
    return ShapeValue(tuple(dims[start:end]))


def _size(node: gs.Node, ti: TensorInfo | None) -> ShapeValue | None:
    """`Size` of a tensor of static shape."""
    if ti is not None and ti.static:
        return ShapeValue((int_arith.wrap(int_arith.product(ti.shape), _INT64),), scalar=True)
    return None


def _identity(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Identity`: its input's value."""
    return args[0]


def _cast_node(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Cast` to an integer type (`_cast`)."""
    return _cast(args[0], _attr(node, "to"))


def _gather(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Gather` on axis 0 by known indices."""
    data, idx = args[0], args[1]
    if data is None or idx is None or not idx.known or data.scalar or _attr(node, "axis", 0) != 0:
        return None
    n = len(data.items)
    indices = cast("tuple[int, ...]", idx.items)  # idx.known: every item is an int
    picked = tuple(data.items[i + n if i < 0 else i] for i in indices)
    return ShapeValue(picked, scalar=idx.scalar, dtype=data.dtype)


def _concat(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Concat` of 1-D values of one type."""
    values = [a for a in args if a is not None]
    if not args or len(values) != len(args) or any(a.scalar or a.dtype != values[0].dtype for a in values):
        return None
    return ShapeValue(tuple(x for a in values for x in a.items), dtype=values[0].dtype)


def _unsqueeze(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Unsqueeze` of a scalar: the 1-D list of its one value."""
    a = args[0]
    if a is not None and a.scalar:
        return ShapeValue(a.items, scalar=False, dtype=a.dtype)
    return None


def _squeeze(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Squeeze` of a 1-D list of one value: that value as a scalar."""
    a = args[0]
    if a is not None and not a.scalar and len(a.items) == 1:
        return ShapeValue(a.items, scalar=True, dtype=a.dtype)
    return None


def _slice(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Slice` of a 1-D list by known start, end, axis 0 and step."""
    data = args[0]
    if (
        data is None
        or data.scalar
        or any(a is None or not a.known for a in args[1:] if a is not None)
        or len(args) < 3
        or args[1] is None
        or args[2] is None
    ):
        return None
    if len(args) > 3 and args[3] is not None and args[3].items not in ((0,), (-1,)):
        return None
    # every given argument after the data is known: its items are ints
    start, end = cast(int, args[1].items[0]), cast(int, args[2].items[0])
    step = cast(int, args[4].items[0]) if len(args) > 4 and args[4] is not None else 1
    return ShapeValue(tuple(data.items[slice(start, end, step)]), dtype=data.dtype)


def _unary(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """`Neg` and `Abs`, entry by entry (a symbol becomes unknown)."""
    if not args or args[0] is None:
        return None
    a = args[0]
    return ShapeValue(tuple(_unary_item(node.op, x, a.dtype) for x in a.items), scalar=a.scalar, dtype=a.dtype)


def _unary_item(op: str, x: int | Sym, dtype: np.dtype) -> int | Sym:
    """One entry of `_unary`: a fresh symbol for a symbol, else the wrapped integer result."""
    if isinstance(x, Sym):
        return _unknown()
    y = int_arith.unary(op, x, dtype)
    assert y is not None  # _unary serves only Neg and Abs, which int_arith knows
    return y


def _elementwise(node: gs.Node, args: list[ShapeValue | None]) -> ShapeValue | None:
    """Binary arithmetic of two values of one type, a single value broadcast against a list."""
    if len(args) != 2:
        return None
    a, b = args
    if a is None or b is None or a.dtype != b.dtype:
        return None
    la, lb = len(a.items), len(b.items)
    if la != lb and 1 not in (la, lb):
        return None
    n = max(la, lb)
    ai = a.items * n if la == 1 else a.items
    bi = b.items * n if lb == 1 else b.items
    fmod = int(_attr(node, "fmod", 0))
    return ShapeValue(
        tuple(_binary(node.op, x, y, a.dtype, fmod) for x, y in zip(ai, bi)),
        scalar=a.scalar and b.scalar,
        dtype=a.dtype,
    )


#: Ops whose value comes from the inferred shape of their input.
_FROM_SHAPES: dict[str, Callable[[gs.Node, TensorInfo | None], ShapeValue | None]] = {"Shape": _shape, "Size": _size}
#: Ops whose value comes from the values of their inputs.
_FROM_ARGS: dict[str, Callable[[gs.Node, list[ShapeValue | None]], ShapeValue | None]] = {
    "Identity": _identity,
    "Cast": _cast_node,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Neg": _unary,
    "Abs": _unary,
    **dict.fromkeys(("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min"), _elementwise),
}


#: Narrowest integer width a dynamic dimension is assumed to fit (a symbol survives a Cast to 32 bits
#: or more; narrower casts make it unknown, since a real dimension may not fit and would wrap).
_SYM_MIN_BITS = 32


def _cast(a: ShapeValue | None, to: int | None) -> ShapeValue | None:
    """ONNX `Cast` of a shape value to an integer element type (low bits kept); None for other types."""
    if a is None or to is None:
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(to)))
    except (KeyError, ValueError, TypeError):  # not an ONNX element type
        return None
    if not int_arith.is_integer(dtype):
        return None
    keep_syms = np.iinfo(dtype).bits >= _SYM_MIN_BITS
    items = tuple(int_arith.cast(x, dtype) if isinstance(x, int) else (x if keep_syms else _unknown()) for x in a.items)
    return ShapeValue(items, scalar=a.scalar, dtype=dtype)
