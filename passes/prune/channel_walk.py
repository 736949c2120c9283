"""The state of one channel dependency walk and the helpers every channel rule uses.

`ChannelWalk` hands out channel ids, joins them (union-find over ids and over their sources),
marks barriers, answers shape questions, records `Site`s and `Reducer`s, and holds the join
rule of elementwise ops (`elementwise`), which layout ops (Concat on another axis) also use.
The per-op rules live in `channel_rules` and `layout_rules`; `channels` runs them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.ops import out_channel_axis
from onnxopt.passes.prune.channel_model import ChannelGroups, Reducer, Site, Unsupported, const_value


def weight_axes(node: gs.Node) -> tuple[int, int]:
    """(input-channel axis, output-channel axis) of a prunable node's weight, from the op table."""
    out = out_channel_axis(node)
    return 1 - out, out


class ChannelWalk:
    """Channel ids, unions, barriers, shapes and sites of one walk over a graph."""

    def __init__(self, graph: gs.Graph, info: dict, pinned: dict) -> None:
        self.graph = graph
        self.info = info
        self.pinned = pinned
        self.cg = ChannelGroups()
        self.position = {id(n): k for k, n in enumerate(graph.nodes)}

    # ---- ids and unions -------------------------------------------------
    def new_ids(self, n: int, source: str, barrier: str | None = None) -> np.ndarray:
        """`n` fresh channel ids of a new source (marked as a barrier when `barrier` says why)."""
        cg = self.cg
        s = len(cg.src_parent)
        cg.src_parent.append(s)
        cg.source_names.append(source)
        start = len(cg.parent)
        ids = np.arange(start, start + n, dtype=np.int64)
        cg.parent.extend(ids.tolist())
        cg.source_of.extend([s] * n)
        if barrier:
            self.mark(ids, barrier)
        return ids

    def src_find(self, s: int) -> int:
        """The root of source `s` in the union-find over sources."""
        p = self.cg.src_parent
        while p[s] != s:
            p[s] = p[p[s]]
            s = p[s]
        return s

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Join the ids of `a` and `b` position by position (and their sources)."""
        cg = self.cg
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = cg.find(x), cg.find(y)
            if rx != ry:
                cg.parent[ry] = rx
            sx, sy = self.src_find(cg.source_of[x]), self.src_find(cg.source_of[y])
            if sx != sy:
                cg.src_parent[sy] = sx

    def mark(self, ids: np.ndarray, reason: str) -> None:
        """Make `ids` a barrier: their group is never pruned, and the report says why."""
        if len(ids):
            self.cg.barrier_marks.append((int(ids[0]), reason))
            self.cg.barrier_marks.extend((int(i), "") for i in ids[1:])

    # ---- shapes -----------------------------------------------------------
    def shape(self, t: gs.Tensor, symbolic: bool = False) -> tuple | None:
        """Inferred shape; symbolic=True uses only what holds for every input shape of the model."""
        v = const_value(t)
        if v is not None:
            return tuple(v.shape)
        ti = self.info.get(t.name)
        if ti is not None and ti.shape is not None:
            return ti.shape
        if symbolic:
            return None
        ti = self.pinned.get(t.name)
        return ti.shape if ti is not None else None

    def pshape(self, t: gs.Tensor) -> tuple | None:
        """Shape at the concrete input shapes (falls back to the symbolic one)."""
        ti = self.pinned.get(t.name)
        return ti.shape if ti is not None and ti.shape is not None else self.shape(t)

    def rank(self, t: gs.Tensor) -> int | None:
        """Rank of `t`, None if unknown."""
        s = self.shape(t)
        return len(s) if s is not None else None

    # ---- what the walk records ----------------------------------------------
    def site(self, kind: str, node: gs.Node, index: int, axis: int, ids: np.ndarray, extra: Any = None) -> None:
        """Record a place to cut when channels are removed (see `Site`)."""
        self.cg.sites.append(Site(kind, node, index, axis, np.asarray(ids, dtype=np.int64), extra))

    def track(self, t: gs.Tensor, axis: int, ids: np.ndarray) -> None:
        """`t` carries channels `ids` on `axis`."""
        self.cg.tensors[t.name] = (axis, ids)

    def reducer(self, node: gs.Node, out: np.ndarray, x: tuple[int, np.ndarray] | None) -> None:
        """Record a layer creating channels `out` and summing over those of its tracked input `x`."""
        self.cg.reducers.append(
            Reducer(node, out, x[1] if x is not None else None, node.inputs[0].name if x is not None else None)
        )

    def label(self, node: gs.Node) -> str:
        """The node's name, or op and position for unnamed nodes."""
        return node.name or f"{node.op}_{self.position[id(node)]}"

    # ---- inputs -------------------------------------------------------------
    def tracked_input(self, node: gs.Node, k: int = 0) -> tuple[int, np.ndarray] | None:
        """(axis, ids) of input `k` if it carries channels."""
        if k >= len(node.inputs):
            return None
        return self.cg.tensors.get(node.inputs[k].name)

    def only_first_tracked(self, node: gs.Node) -> tuple[int, np.ndarray]:
        """(axis, ids) of the data input; channels reaching any other input are unsupported."""
        x = self.tracked_input(node, 0)
        if x is None or any(t.name in self.cg.tensors for t in node.inputs[1:]):
            raise Unsupported("channels reach a non-data input")
        return x

    def constant_axes(self, node: gs.Node) -> list[int] | None:
        """The `axes` of a node, from its attribute or constant second input (None: not given)."""
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            v = const_value(node.inputs[1])
            if v is None:
                raise Unsupported("dynamic axes")
            axes = v.tolist()
        return list(axes) if axes is not None else None

    # ---- the join rule -------------------------------------------------------
    def elementwise(self, node: gs.Node) -> None:
        """Operands broadcast against each other: their channels are joined position by position."""
        ranks = [self.rank(t) for t in node.inputs]
        tracked = [(k, self.cg.tensors[t.name]) for k, t in enumerate(node.inputs) if t.name in self.cg.tensors]
        from_end = set()
        for k, (ax, _) in tracked:
            rank = ranks[k]
            if rank is None:
                raise Unsupported("unknown rank")
            from_end.add(rank - ax)
        if len(from_end) != 1:
            raise Unsupported("operands carry channels on different axes")
        fe = from_end.pop()
        ref = tracked[0][1][1]
        for _, (_, ids) in tracked[1:]:
            if len(ids) != len(ref):
                raise Unsupported("operands disagree on the channel count")
            self.union(ref, ids)
        for k, t in enumerate(node.inputs):
            if t.name not in self.cg.tensors:
                self._broadcast_operand(node, k, t, fe, ref)
        out_rank = self.rank(node.outputs[0]) or max(r for r in ranks if r is not None)
        self.track(node.outputs[0], out_rank - fe, ref)

    def _broadcast_operand(self, node: gs.Node, k: int, t: gs.Tensor, from_end: int, ref: np.ndarray) -> None:
        """An untracked operand of an elementwise op: per-channel constants are cut with the channels."""
        shape = self.shape(t)
        if shape is None:
            raise Unsupported(f"operand '{t.name}' has an unknown shape")
        pos = len(shape) - from_end
        if pos < 0 or shape[pos] == 1:
            return
        if shape[pos] != len(ref):
            raise Unsupported(f"operand '{t.name}' does not broadcast on the channel axis")
        if const_value(t) is None:
            raise Unsupported(f"operand '{t.name}' carries untracked channels")
        self.site("const", node, k, pos, ref)
