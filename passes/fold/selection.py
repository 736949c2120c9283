"""Which nodes constant folding evaluates, and which it leaves for the runtime (with the reason).

A node folds when every input is a constant (or the output of a node folded
with it), its op is a standard one that computes the same value every run, numpy
holds its element types exactly, and folding it neither undoes int8 weight
storage, nor materializes a generator beyond `size_limit_mb`, nor writes a copy
of a large constant that other nodes keep reading.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_nbytes
from onnxopt.ir.graph import constant_value, output_owners, subgraphs_of
from onnxopt.ir.gs_compat import LazyValues, stored_values
from onnxopt.ir.ops import INT8_STORAGE_MIN_ELEMENTS
from onnxopt.kernels import int_arith
from onnxopt.passes.fold.dtypes import exact_in_numpy, is_float, onnx_type_exact

#: Reports a node left alone and why: skip(node, reason).
Skip = Callable[[gs.Node, str], None]

NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceInsert",
    "SequenceErase",
    "SequenceAt",
    "SequenceLength",
    "SplitToSequence",
    "ConcatFromSequence",
    "Optional",
    "OptionalGetElement",
    "OptionalHasElement",
    "If",
    "Loop",
    "Scan",
}
GENERATORS = {"ConstantOfShape", "Expand", "Tile", "Range"}
#: A constant at least this large that other nodes also read is not folded through an op whose output is as
#: large as its input: the result would be a second copy next to the first (e.g. Unsqueeze(W) in both
#: branches of an If turned one LSTM weight into two).
SHARED_COPY_BYTES = 16 * 1024
#: Ops whose output is small whatever their input: folding them copies nothing.
_SMALL_OUTPUT = {"Shape", "Size", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ArgMax", "ArgMin"}
STANDARD_DOMAINS = {"", "ai.onnx"}
#: Errors computing a generator's size from inputs that do not describe a valid output (missing, wrong
#: rank, zero step...): its size is then unknown.
_SIZE_ERRORS = (AttributeError, IndexError, OverflowError, TypeError, ValueError, ZeroDivisionError)


def size_limit_bytes(size_limit_mb: float) -> int | None:
    """`size_limit_mb` in bytes; None = no limit (0 or +inf). NaN or a negative size (not valid options,
    rejected when options are parsed) keep every generator rather than fail."""
    if size_limit_mb == 0 or size_limit_mb == float("inf"):
        return None
    if not size_limit_mb > 0:
        return 0
    return int(size_limit_mb * 2**20)


def foldable_nodes(root: gs.Graph, g: gs.Graph, limit: int | None, skip: Skip) -> list[gs.Node]:
    """Nodes of `g` computable from constants alone, in order, respecting the size policy; `skip` hears
    of every node left out for a reason the report shows."""
    pending: set[int] = set()
    out: list[gs.Node] = []
    owners = output_owners(root)
    for node in g.nodes:
        if not _may_fold(node, owners, skip) or not _inputs_ready(node, pending):
            continue
        reason = _policy_reason(node, limit)
        if reason is not None:
            skip(node, reason)
            continue
        out.append(node)
        pending.update(id(t) for t in node.outputs)
    return without_copies(out, skip)


def _never_evaluated(node: gs.Node) -> bool:
    """Ops folding never evaluates: random, Q/DQ, sequences, control flow, other domains, sparse Constants."""
    return (
        not node.outputs
        or node.op in NEVER_FOLD
        or (node.domain or "") not in STANDARD_DOMAINS
        or bool(subgraphs_of(node))
        or node.op == "Constant"  # a Constant left as a node is sparse
    )


def _may_fold(node: gs.Node, owners: dict[int, gs.Graph], skip: Skip) -> bool:
    """Whether `node`'s op and types allow folding at all (inputs aside)."""
    if _never_evaluated(node):
        return False
    reason = inexact_reason(node)
    if reason is not None:
        skip(node, reason)
        return False
    return not (any(id(t) in owners for t in node.outputs) or expands_int8_weight(node))


def _inputs_ready(node: gs.Node, pending: set[int]) -> bool:
    """Every input is a constant now, or (except for generators and integer Div, which are checked on
    real constants in the next round) the output of a node folded in this batch."""
    variables = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
    if any(id(t) not in pending for t in variables):
        return False
    if variables and node.op in GENERATORS:
        return False  # size known only once inputs are real constants: next round
    if node.op == "Div" and any(id(t) in pending and not is_float(t) for t in node.inputs):
        return False  # an integer division is checked for traps on real constants: next round
    return True


def _policy_reason(node: gs.Node, limit: int | None) -> str | None:
    """Why a node whose inputs are ready is still left for the runtime (None: it folds)."""
    if (
        node.op == "Div"
        and len(node.inputs) == 2
        and int_arith.division_traps(*(constant_value(t) for t in node.inputs))
    ):
        return "integer division by zero (or of the minimum by -1): left for the runtime"
    if node.op in GENERATORS and limit is not None:
        size = generator_bytes(node)
        if size is None or size > limit:
            return (
                f"output {'of unknown size' if size is None else f'{size / 2**20:.1f} MB'} "
                f"above size_limit_mb={limit / 2**20:g}: generator kept"
            )
    return None


def expands_int8_weight(node: gs.Node) -> bool:
    """A Cast of a large int8/uint8 constant to a float type: int8 weight storage (as `quantize`
    writes it) that the runtime expands at load; folding it would undo the compression."""
    x = node.inputs[0] if node.op == "Cast" and node.inputs else None
    return (
        isinstance(x, gs.Constant)
        and exact_in_numpy(x.dtype)
        and np.dtype(x.dtype) in (np.dtype(np.int8), np.dtype(np.uint8))
        and int(np.prod(x.shape)) >= INT8_STORAGE_MIN_ELEMENTS
        and node.attrs.get("to") in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    )


def inexact_reason(node: gs.Node) -> str | None:
    """Why `node` is not evaluated through numpy: an input or output of an element type numpy cannot hold
    exactly (bfloat16, float8, int4/uint4, float4); folding such values would also expand compact storage."""
    for t in node.inputs:
        if isinstance(t, gs.Constant) and (
            not exact_in_numpy(t.dtype)
            or (isinstance(v := stored_values(t), LazyValues) and not onnx_type_exact(v.tensor.data_type))
        ):
            return f"input {t.name!r} has an element type numpy cannot hold exactly: left as is"
    target = _output_type(node)
    if target is not None and not onnx_type_exact(target):
        return "output of an element type numpy cannot hold exactly: left as is"
    return None


def _output_type(node: gs.Node) -> int | None:
    """The ONNX element type a Cast, CastLike or ConstantOfShape writes, where the node says it."""
    if node.op == "Cast":
        return node.attrs.get("to")
    source = None
    if node.op == "CastLike" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        source = node.inputs[1]
    elif node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
        source = node.attrs["value"]
    lazy = stored_values(source) if source is not None else None
    return lazy.tensor.data_type if isinstance(lazy, LazyValues) else None


def generator_bytes(node: gs.Node) -> int | None:
    """Bytes the generator would produce, from its (constant) inputs (None: unknown)."""
    vals = [constant_value(t) if t.name else None for t in node.inputs]
    size = _GENERATOR_SIZES.get(node.op)
    try:
        return None if size is None else size(node, vals)
    except _SIZE_ERRORS:
        return None


def _constant_of_shape_bytes(node: gs.Node, vals: list) -> int:
    """ConstantOfShape: the element count of its shape input times the value's item size."""
    value = node.attrs.get("value")
    item = value.values.dtype.itemsize if isinstance(value, gs.Constant) else 4
    return int_arith.product(vals[0].reshape(-1)) * item


def _expand_bytes(node: gs.Node, vals: list) -> int:
    """Expand: the broadcast shape of the input and the target."""
    shape = np.broadcast_shapes(vals[0].shape, tuple(int(v) for v in vals[1]))
    return int_arith.product(shape) * vals[0].dtype.itemsize


def _tile_bytes(node: gs.Node, vals: list) -> int:
    """Tile: the input times the product of the repeats."""
    return vals[0].size * int_arith.product(vals[1].reshape(-1)) * vals[0].dtype.itemsize


def _range_bytes(node: gs.Node, vals: list) -> int:
    """Range: ceil((limit - start) / delta) elements of the start's type."""
    start, stop, delta = (np.asarray(v).item() for v in vals[:3])
    return max(0, int(np.ceil((stop - start) / delta))) * np.asarray(vals[0]).dtype.itemsize


_GENERATOR_SIZES: dict[str, Callable[[gs.Node, list], int]] = {
    "ConstantOfShape": _constant_of_shape_bytes,
    "Expand": _expand_bytes,
    "Tile": _tile_bytes,
    "Range": _range_bytes,
}


def without_copies(nodes: list[gs.Node], skip: Skip) -> list[gs.Node]:
    """`nodes` (in order) less those whose folded output would be a copy of a large constant that stays:
    one that a node not folded now also reads (in this graph or another body), and what depends on them.
    When every reader folds (the slices of one weight), the constant goes and nothing is copied."""
    while True:
        members = {id(n) for n in nodes}
        drop = {id(n): t for n in nodes if (t := shared_large_input(n, members)) is not None}
        if not drop:
            return nodes
        nodes = _drop_copies(nodes, drop, skip)


def _drop_copies(nodes: list[gs.Node], drop: dict[int, gs.Constant], skip: Skip) -> list[gs.Node]:
    """`nodes` less those in `drop` (id -> the large constant they would copy) and what reads their outputs."""
    dead: set[int] = set()
    kept = []
    for n in nodes:
        if id(n) in drop or any(id(t) in dead for t in n.inputs):
            dead.update(id(t) for t in n.outputs)
            if id(n) in drop:
                t = drop[id(n)]
                skip(
                    n,
                    f"would copy the constant '{t.name}' ({constant_nbytes(t) // 1024} KB), which "
                    f"{len({id(c) for c in t.outputs})} nodes read: left for the runtime",
                )
            continue
        kept.append(n)
    return kept


def shared_large_input(node: gs.Node, folding: set[int]) -> gs.Constant | None:
    """A constant input of `node` of at least SHARED_COPY_BYTES that a node outside `folding` (ids of the
    nodes folded together, in one graph) also reads, in any graph: folding `node` would write its output
    next to a constant that stays (None: folding copies nothing)."""
    if node.op in _SMALL_OUTPUT:
        return None
    for t in node.inputs:
        if (
            isinstance(t, gs.Constant)
            and constant_nbytes(t) >= SHARED_COPY_BYTES
            and any(id(c) not in folding for c in t.outputs)
        ):
            return t
    return None
