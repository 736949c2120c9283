"""No-op nodes removed exactly: Identity and inference-time Dropout are bypassed, and nodes shape
inference proves redundant (a Cast to the input's own type, a Slice keeping every element...) become
Identities first, or merge with the view before them (`views`).

Shape facts come from inference over the main graph, so with pinned input shapes
(`--input-shape`) more of them apply.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.ir.graph import (
    constant_value,
    detach,
    iter_graphs,
    model_opsets,
    output_owners,
    replace_all_uses,
    toposort,
)
from onnxopt.passes.fold.views import (
    const_ints,
    merge_reshape_of_view,
    merge_unsqueezes,
    shape_of,
    transpose_to_reshape,
)

_INT64_MAX = int(np.iinfo(np.int64).max)
#: Ops `eliminate_redundant_nodes` looks at.
_CANDIDATES = {"Cast", "CastLike", "Expand", "Slice", "Concat", "Transpose", "Pad", "Reshape", "Unsqueeze"}


def remove_identities(graph: gs.Graph, counts: dict) -> int:
    """Bypass Identity and inference-time Dropout (when its mask is unused)."""
    n = 0
    owners = output_owners(graph)
    for g in iter_graphs(graph):
        for node in list(g.nodes):
            if not _is_identity(node):
                continue
            src, out = node.inputs[0], node.outputs[0]
            if id(out) in owners:
                if not _hand_output_name_to_producer(g, src, out, owners):
                    continue  # the output name must stay and nothing else can carry it
            else:
                replace_all_uses(graph, out, src, owners)
            detach(node)
            n += 1
    counts["identity_removed"] += n
    return n


def _is_identity(node: gs.Node) -> bool:
    """An Identity, or a Dropout that passes its input through (inference mode, mask unused)."""
    if node.op == "Identity":
        return True
    return (
        node.op == "Dropout" and not (len(node.outputs) > 1 and node.outputs[1].outputs) and _dropout_is_inference(node)
    )


def _hand_output_name_to_producer(g: gs.Graph, src: gs.Tensor, out: gs.Tensor, owners: dict[int, gs.Graph]) -> bool:
    """Let the producer of `src` (in graph `g`) produce the graph output `out` directly.

    Keeps the output's name (the signature) while removing the Identity in front of it;
    other consumers of `src` then read `out`. Not possible when `src` is itself a graph
    input or output, a constant, or comes from an enclosing graph.
    """
    p = src.inputs[0] if src.inputs else None
    if (
        p is None
        or isinstance(src, gs.Constant)
        or id(src) in owners
        or any(i is src for i in g.inputs)
        or not any(n is p for n in g.nodes)
    ):
        return False
    for consumer in list(src.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is src:
                consumer.inputs[i] = out
    out.inputs.clear()
    k = next(i for i, t in enumerate(p.outputs) if t is src)
    p.outputs[k] = out
    return True


def _dropout_is_inference(node: gs.Node) -> bool:
    """A Dropout whose `training_mode` input is absent or a constant false."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = constant_value(node.inputs[2])
        return v is not None and not bool(np.asarray(v).item())
    return True


def may_be_redundant(graph: gs.Graph) -> bool:
    """Whether the main graph has a node `eliminate_redundant_nodes` looks at (else shapes are not needed)."""
    return any(n.op in _CANDIDATES and not n.domain for n in graph.nodes)


def eliminate_redundant_nodes(graph: gs.Graph, counts: dict, info: dict[str, TensorInfo]) -> int:
    """Rewrite nodes of the main graph that shape inference (`info`, of the graph as it is) proves
    redundant; returns how many.

    - a no-op becomes an Identity (which `remove_identities` then bypasses): Cast/CastLike to the
      input's own type, Expand to a shape the input already has, Slice keeping every element,
      Concat of one input, Transpose by the identity permutation, Pad by zeros, Reshape to the
      input's own static shape;
    - a Reshape of a view (Reshape/Flatten/Squeeze/Unsqueeze) reads the view's input, when its
      target copies no dim (no 0 entry) or its output shape is static (the target becomes it);
    - an Unsqueeze of an Unsqueeze becomes one Unsqueeze;
    - a Transpose that only moves size-1 axes, next to a Reshape, becomes a Reshape (then merged).
    """
    opset = next((int(o.version) for o in model_opsets(graph) if o.domain in ("", "ai.onnx")), 0)
    toposort(graph)
    members = {id(node) for node in graph.nodes}
    n = 0
    for node in list(graph.nodes):
        if node.op not in _CANDIDATES or node.domain or len(node.outputs) != 1 or not node.inputs:
            continue
        if not node.inputs[0].name:
            continue
        if node.op == "Reshape" and merge_reshape_of_view(graph, node, info, members):
            n += 1
        elif node.op == "Unsqueeze":
            n += merge_unsqueezes(graph, node, info, opset, members)
        elif is_noop(node, info, opset):
            _to_identity(node)
            n += 1
        elif node.op == "Transpose":
            n += transpose_to_reshape(graph, node, info)
    counts["redundant_removed"] = counts.get("redundant_removed", 0) + n
    return n


def _to_identity(node: gs.Node) -> None:
    """Turn `node` into an Identity of its first input (bypassed later by `remove_identities`)."""
    x = node.inputs[0]
    node.inputs.clear()
    node.inputs.append(x)
    node.op, node.attrs = "Identity", {}


def is_noop(node: gs.Node, info: dict[str, TensorInfo], opset: int) -> bool:
    """True when `node` returns its first input unchanged (value, dtype and shape)."""
    if node.op in ("Cast", "CastLike"):
        return _cast_is_noop(node, info)
    if node.op == "Concat":
        return len(node.inputs) == 1
    shape = shape_of(node.inputs[0], info)
    check = _SHAPED_NOOPS.get(node.op)
    return shape is not None and check is not None and check(node, shape, info, opset)


def _cast_is_noop(node: gs.Node, info: dict[str, TensorInfo]) -> bool:
    """A Cast or CastLike to the element type its input already has."""
    src = info.get(node.inputs[0].name)
    if node.op == "Cast":
        to = node.attrs.get("to")
    else:
        like = node.inputs[1].name if len(node.inputs) > 1 else None
        to = info[like].elem_type if like in info else None
    return src is not None and bool(src.elem_type) and src.elem_type == to


def _expand_is_noop(node: gs.Node, shape: tuple, info: dict[str, TensorInfo], opset: int) -> bool:
    """An Expand to a shape the input already has (every target dim 1 or equal)."""
    target = const_ints(node, 1, "")
    return (
        target is not None
        and len(target) <= len(shape)
        and all(t == 1 or d == t for t, d in zip(reversed(target), reversed(shape)))
    )


def _transpose_is_noop(node: gs.Node, shape: tuple, info: dict[str, TensorInfo], opset: int) -> bool:
    """A Transpose by the identity permutation (or of rank <= 1 without one)."""
    perm = node.attrs.get("perm")
    return list(perm) == list(range(len(shape))) if perm is not None else len(shape) <= 1


def _pad_is_noop(node: gs.Node, shape: tuple, info: dict[str, TensorInfo], opset: int) -> bool:
    """A Pad by zeros on every side."""
    pads = const_ints(node, 1, "pads" if opset < 11 else "")
    return pads is not None and not any(pads)


def _reshape_is_noop(node: gs.Node, shape: tuple, info: dict[str, TensorInfo], opset: int) -> bool:
    """A Reshape to the input's own static shape."""
    out = shape_of(node.outputs[0], info)
    return out is not None and tuple(out) == tuple(shape) and all(isinstance(d, int) for d in shape)


def _slice_is_noop(node: gs.Node, shape: tuple, info: dict[str, TensorInfo], opset: int) -> bool:
    """A Slice with step 1 that keeps every element of every axis it names."""
    args = _slice_args(node, opset)
    if args is None:
        return False
    return all(_keeps_axis(shape, start, end, axis, step) for start, end, axis, step in zip(*args))


#: No-op checks of ops whose answer depends on the input's shape: check(node, shape, info, opset).
_SHAPED_NOOPS: dict[str, Callable[[gs.Node, tuple, dict, int], bool]] = {
    "Expand": _expand_is_noop,
    "Transpose": _transpose_is_noop,
    "Pad": _pad_is_noop,
    "Reshape": _reshape_is_noop,
    "Slice": _slice_is_noop,
}


def _slice_args(node: gs.Node, opset: int) -> tuple[list, list, list, list] | None:
    """(starts, ends, axes, steps) of a Slice, as inputs (opset >= 10) or attributes; None when not
    constant or not of one length."""
    new_form = opset >= 10
    starts = const_ints(node, 1, "starts") if new_form else node.attrs.get("starts")
    ends = const_ints(node, 2, "ends") if new_form else node.attrs.get("ends")
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = const_ints(node, 3, "") if new_form else node.attrs.get("axes")
    steps = const_ints(node, 4, "") if new_form else None
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    if len(axes) != len(starts) or len(steps) != len(starts):
        return None
    return starts, ends, axes, steps


def _keeps_axis(shape: tuple, start: int, end: int, axis: int, step: int) -> bool:
    """Whether slicing `axis` of `shape` from `start` to `end` by `step` keeps all of it."""
    axis = axis + len(shape) if axis < 0 else axis
    if step != 1 or not 0 <= axis < len(shape):
        return False
    dim = shape[axis]
    if isinstance(dim, int):
        start, end = (start + dim if start < 0 else start), (end + dim if end < 0 else end)
        return not (start > 0 or end < dim)
    return start == 0 and end >= _INT64_MAX  # unknown size: only "from 0 to the end" keeps everything
