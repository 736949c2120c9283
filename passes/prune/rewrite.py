"""The rewrite of the prune pass: slice every constant that carries a removed channel, and fix the
group counts, split sizes, slice bounds and Reshape targets that name the channel count, so the saved
model is physically smaller."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import unique_name
from onnxopt.passes.prune.channel_model import ChannelGroups, Site, const_value
from onnxopt.passes.prune.plan import Plan


def apply_removal(plan: Plan, removed: set[int]) -> None:
    """Remove the channel classes `removed` from the plan's graph (with the plan's edited weights)."""
    _rewrite_constants(plan, removed)
    g = plan.graph
    for s in plan.cg.sites:
        mask = plan.cg.keep_mask(s.ids, removed)
        if s.kind != "const" and not mask.all():
            _SITE_REWRITES[s.kind](g, s, mask)
    _forget_shapes(g, plan.cg)


def _rewrite_constants(plan: Plan, removed: set[int]) -> None:
    """Write back edited constants and slice every constant input that carries removed channels."""
    cg, g = plan.cg, plan.graph
    by_input: dict[tuple[int, int], list] = defaultdict(list)
    nodes: dict[int, gs.Node] = {}
    for s in cg.sites:
        if s.kind == "const":
            by_input[(id(s.node), s.index)].append((s.axis, s.ids))
            nodes[id(s.node)] = s.node
    for node, idx, ids in plan.extra_sites:
        by_input[(id(node), idx)].append((0, ids))
        nodes[id(node)] = node
    for node, _ in plan.dirty_slots:
        nodes[id(node)] = node
    for key in set(by_input) | plan.dirty:
        node = nodes[key[0]]
        idx = key[1]
        orig = const_value(node.inputs[idx])
        assert orig is not None  # every input cut or rewritten here is a constant
        changed = key in plan.dirty
        arr = plan.values[key] if changed else orig
        for axis, ids in by_input.get(key, []):
            mask = cg.keep_mask(ids, removed)
            if not mask.all():
                arr = np.compress(mask, arr, axis=axis)
                changed = True
        if changed:
            base = node.inputs[idx].name or "w"
            node.inputs[idx] = gs.Constant(
                unique_name(g, f"{base}_pruned"), np.ascontiguousarray(arr.astype(orig.dtype))
            )


def _rewrite_group(g: gs.Graph, s: Site, mask: np.ndarray) -> None:
    """A depthwise conv's `group` becomes its kept channel count."""
    s.node.attrs["group"] = int(mask.sum())


def _rewrite_split(g: gs.Graph, s: Site, mask: np.ndarray) -> None:
    """A Split's sizes shrink by the channels removed from each part."""
    bounds = s.extra
    sizes = [int(mask[bounds[i] : bounds[i + 1]].sum()) for i in range(len(bounds) - 1)]
    if g.opset < 13:
        s.node.attrs["split"] = sizes
        return
    split = gs.Constant(unique_name(g, "split_pruned"), np.array(sizes, np.int64))
    s.node.attrs.pop("num_outputs", None)
    if len(s.node.inputs) > 1:
        s.node.inputs[1] = split
    else:
        s.node.inputs.append(split)


def _rewrite_slice(g: gs.Graph, s: Site, mask: np.ndarray) -> None:
    """A Slice of the channel axis keeps its bounds around the kept channels."""
    start, end = s.extra
    j = s.index
    new_start = int(mask[:start].sum())
    new_end = new_start + int(mask[start:end].sum())
    for inp, val in ((1, new_start), (2, new_end)):
        v = np.array(const_value(s.node.inputs[inp]), copy=True)
        v[j] = val
        s.node.inputs[inp] = gs.Constant(unique_name(g, "slice_pruned"), v)


def _rewrite_reshape(g: gs.Graph, s: Site, mask: np.ndarray) -> None:
    """The channel entry of a Reshape's target shape (or of the constant piece it is built from)."""
    idx = 1 if s.kind == "reshape" else s.index
    v = np.array(const_value(s.node.inputs[idx]), copy=True)
    flat = v.reshape(-1)
    flat[s.axis] = int(mask.sum())
    s.node.inputs[idx] = gs.Constant(unique_name(g, "shape_pruned"), v)


_SITE_REWRITES = {
    "group": _rewrite_group,
    "split": _rewrite_split,
    "slice": _rewrite_slice,
    "reshape": _rewrite_reshape,
    "reshape_piece": _rewrite_reshape,
}


def _forget_shapes(g: gs.Graph, cg: ChannelGroups) -> None:
    """Drop the now stale shapes of the inner tensors that carried channels (inference redoes them)."""
    io = {t.name for t in g.inputs} | {t.name for t in g.outputs}
    tensors = g.tensors()
    for name in cg.tensors:
        t = tensors.get(name)
        if isinstance(t, gs.Variable) and name not in io:
            t.shape = None
