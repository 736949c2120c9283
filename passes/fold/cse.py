"""Common subexpression elimination: equal constants merged by content, then nodes with the same op,
attributes and inputs.

Constant contents are keyed without copying weights: a weight still in its
TensorProto is hashed there, one staged on disk is keyed by file and offset.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import detach, iter_graphs, output_owners, replace_all_uses, subgraphs_of, toposort
from onnxopt.ir.gs_compat import LazyValues, stored_values
from onnxopt.ir.weights import external_info, is_external
from onnxopt.passes.fold.dtypes import exact_in_numpy
from onnxopt.passes.fold.selection import NEVER_FOLD

#: Ops never merged: those folding never evaluates, except Q/DQ (two equal ones compute the same thing).
_NEVER_MERGED = NEVER_FOLD - {"QuantizeLinear", "DequantizeLinear"}


def eliminate_common_subexpressions(graph: gs.Graph, counts: dict) -> int:
    """Merge equal constants, then nodes with the same op, attributes and inputs (in topological order).

    Random ops, nodes with subgraphs and nodes producing a graph output are never merged.
    """
    owners = output_owners(graph)
    n = 0
    for g in iter_graphs(graph):
        _merge_constants(g, owners)
        toposort(g)
        n += _merge_nodes(graph, g, owners)
    counts["cse_merged"] += n
    return n


def _merge_constants(g: gs.Graph, owners: dict[int, gs.Graph]) -> None:
    """Make every node of `g` read the first of equal constants (graph outputs excepted)."""
    canon: dict[tuple, gs.Constant] = {}
    for node in g.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and id(t) not in owners:
                first = canon.setdefault(constant_key(t), t)
                if first is not t:
                    node.inputs[i] = first


def _merge_nodes(graph: gs.Graph, g: gs.Graph, owners: dict[int, gs.Graph]) -> int:
    """Replace each node of `g` that computes what an earlier one does by that one; how many went."""
    n = 0
    seen: dict[tuple, gs.Node] = {}
    for node in list(g.nodes):
        key = _node_key(node, owners)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is node:
            continue
        for mine, theirs in zip(list(node.outputs), list(first.outputs)):
            replace_all_uses(graph, mine, theirs, owners)
        detach(node)
        n += 1
    return n


def _node_key(node: gs.Node, owners: dict[int, gs.Graph]) -> tuple | None:
    """What `node` computes (op, attributes, input tensors); None for a node never merged."""
    if not node.outputs or node.op in _NEVER_MERGED or subgraphs_of(node) or any(id(t) in owners for t in node.outputs):
        return None
    try:
        key = (
            node.op,
            node.domain or "",
            tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())),
            tuple(id(t) if t.name else None for t in node.inputs),
            len(node.outputs),
        )
        hash(key)
    except TypeError:  # an attribute that cannot be compared (unorderable or unhashable): never merged
        return None
    return key


def _attr_key(value: object) -> object:
    """A hashable, comparable form of an attribute value (tensors by content, NaN equal to itself)."""
    if isinstance(value, gs.Constant):
        return ("tensor",) + constant_key(value)
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def constant_key(t: gs.Constant) -> tuple:
    """Content key of a constant; weights still in their TensorProto are hashed there (or, staged on
    disk, keyed by file and offset), never copied to numpy."""
    lazy = stored_values(t)
    if isinstance(lazy, LazyValues):
        return _lazy_key(lazy)
    v = np.asarray(t.values)  # shape taken here: ascontiguousarray would make a scalar 1-D
    if v.dtype.kind in "OSU":  # strings: hashed in their ONNX form
        data = onnx.numpy_helper.from_array(v).SerializeToString(deterministic=True)
    else:
        data = np.ascontiguousarray(v).view(np.uint8).reshape(-1) if v.size else b""
    return (v.dtype.str, v.shape, hashlib.sha1(data).hexdigest())


def _lazy_key(lazy: LazyValues) -> tuple:
    """Content key of a constant still in its TensorProto."""
    if is_external(lazy.tensor):  # staged on disk: its place is its identity
        return (_dtype_key(lazy), tuple(lazy.shape), external_info(lazy.tensor))
    if lazy.tensor.HasField("raw_data"):
        return (_dtype_key(lazy), tuple(lazy.shape), hashlib.sha1(lazy.tensor.raw_data).hexdigest())
    data = onnx.TensorProto()  # typed fields (strings, int32_data...): hashed as stored, never loaded
    data.CopyFrom(lazy.tensor)
    data.name = ""
    digest = hashlib.sha1(data.SerializeToString(deterministic=True)).hexdigest()
    return (_dtype_key(lazy), tuple(lazy.shape), digest)


def _dtype_key(lazy: LazyValues) -> object:
    """The element type part of a key: numpy's name where exact, else the ONNX type number."""
    return np.dtype(lazy.dtype).str if exact_in_numpy(lazy.dtype) else ("onnx", lazy.tensor.data_type)
