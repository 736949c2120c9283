"""Channel rules of the ops that move values around: Transpose, Squeeze/Unsqueeze, Flatten, Reshape,
Concat, Split, Slice and Q/DQ.

They move the channel axis, repeat channel ids where the channel axis merges with trailing sizes,
and cut them where a tensor is split; the cuts (split sizes, slice bounds, Reshape target shapes)
are recorded as sites so the prune pass can rewrite them.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value
from onnxopt.passes.prune.channel_model import Unsupported, const_value
from onnxopt.passes.prune.channel_walk import ChannelWalk

#: Ops a computed Reshape target shape may pass through on its way from a Concat.
_SHAPE_PASS_OPS = ("Cast", "Identity")


def _skip_casts(t: gs.Tensor) -> gs.Tensor:
    """The tensor behind a chain of Cast/Identity nodes."""
    while t.inputs and t.inputs[0].op in _SHAPE_PASS_OPS:
        t = t.inputs[0].inputs[0]
    return t


class LayoutRules(ChannelWalk):
    """How channels move through layout ops."""

    def _op_Transpose(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        perm = node.attrs.get("perm")
        rank = self.rank(node.inputs[0])
        if perm is None:
            if rank is None:
                raise Unsupported("unknown rank")
            perm = list(range(rank))[::-1]
        self.track(node.outputs[0], list(perm).index(axis), ids)

    def _op_Squeeze(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        shape = self.shape(node.inputs[0])
        axes = self.constant_axes(node)
        if shape is None:
            raise Unsupported("unknown rank")
        if axes is None:
            axes = [k for k, d in enumerate(shape) if d == 1]
        axes = [a % len(shape) for a in axes]
        if axis in axes:
            raise Unsupported("squeezes the channel axis")
        self.track(node.outputs[0], axis - sum(a < axis for a in axes), ids)

    def _op_Unsqueeze(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        axes = self.constant_axes(node)
        if rank is None or axes is None:
            raise Unsupported("unknown rank")
        out_rank = rank + len(axes)
        inserted = sorted(a % out_rank for a in axes)
        pos = [k for k in range(out_rank) if k not in inserted]
        self.track(node.outputs[0], pos[axis], ids)

    def _op_Flatten(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        shape = self.shape(node.inputs[0])
        if shape is None:
            raise Unsupported("unknown shape")
        a = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        if a > axis:
            raise Unsupported("merges channels into the batch axis")
        sym = self.shape(node.inputs[0], symbolic=True) or ()
        inner, outer = sym[axis + 1 :], sym[a:axis]
        if len(sym) != len(shape):
            raise Unsupported("trailing size is not static")
        if not all(isinstance(d, int) for d in (*inner, *outer)):
            raise Unsupported("trailing size is not static")
        s, t = int(np.prod(inner)), int(np.prod(outer))
        self.track(node.outputs[0], 1, np.tile(np.repeat(ids, s), t))

    def _op_Reshape(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        xs, ys = self.pshape(node.inputs[0]), self.pshape(node.outputs[0])
        if xs is None or ys is None:
            raise Unsupported("unknown shapes")
        same_lead = len(ys) > axis and all(a == b and a is not None for a, b in zip(xs[:axis], ys[:axis]))
        if not same_lead:
            raise Unsupported("reshape moves or splits the channel axis")
        out = np.repeat(ids, self._reshape_repeat(node, axis, xs, ys))
        self._shape_entry_site(node, axis, out)
        self.track(node.outputs[0], axis, out)

    def _reshape_repeat(self, node: gs.Node, axis: int, xs: tuple, ys: tuple) -> int:
        """How many times each channel id repeats on the Reshape's output channel axis."""
        if len(ys) == axis + 1:
            sym = self.shape(node.inputs[0], symbolic=True) or (None,) * len(xs)
            inner = sym[axis + 1 :]
            if len(sym) != len(xs) or not all(isinstance(d, int) for d in inner):
                raise Unsupported("trailing size is not static")
            return int(np.prod(cast("tuple[int, ...]", inner)))  # all ints: checked above
        if ys[axis] == xs[axis] and isinstance(xs[axis], int):
            return 1
        raise Unsupported("reshape splits the channel axis")

    def _shape_entry_site(self, node: gs.Node, axis: int, ids: np.ndarray) -> None:
        """Record where the channel entry of a Reshape's target shape lives (constant or a Concat piece)."""
        shape_t = node.inputs[1]
        v = const_value(shape_t)
        if v is not None:
            if int(v[axis]) not in (0, -1):
                self.site("reshape", node, 1, axis, ids)
            return
        src = _skip_casts(shape_t)
        p = src.inputs[0] if src.inputs else None
        if p is None or p.op != "Concat":
            raise Unsupported("target shape computed in a way the rules do not follow")
        offset = 0
        for k, piece in enumerate(p.inputs):
            n = self._piece_entry(p, k, piece, axis - offset, ids)
            if n is None:
                return
            offset += n
        raise Unsupported("target shape shorter than expected")

    def _piece_entry(self, concat: gs.Node, k: int, piece: gs.Tensor, entry: int, ids: np.ndarray) -> int | None:
        """Piece `k` of a Concat building a target shape: its length if entry `entry` (the channel entry,
        counted from the piece's start) lies beyond it, else None once the entry's site is recorded."""
        base, user, slot = piece, concat, k
        while base.inputs and base.inputs[0].op in _SHAPE_PASS_OPS:
            user, slot = base.inputs[0], 0
            base = user.inputs[0]
        pv = constant_value(base)
        ps = self.shape(piece)
        n = len(pv.reshape(-1)) if pv is not None else (ps[0] if ps and isinstance(ps[0], int) else None)
        if n is None:
            raise Unsupported("target shape piece of unknown length")
        if not 0 <= entry < n:
            return n
        if pv is None:
            raise Unsupported("channel entry of the target shape is computed at run time")
        if int(pv.reshape(-1)[entry]) not in (0, -1):
            self.site("reshape_piece", user, slot, entry, ids)
        return None

    def _op_Concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0]) or next((self.rank(t) for t in node.inputs if self.rank(t)), None)
        if rank is None:
            raise Unsupported("unknown rank")
        cat = int(node.attrs["axis"]) % rank
        tracked = [self.cg.tensors[t.name] for t in node.inputs if t.name in self.cg.tensors]
        axes = {a for a, _ in tracked}
        if len(axes) != 1:
            raise Unsupported("inputs carry channels on different axes")
        axis = axes.pop()
        if cat != axis:
            return self.elementwise(node)
        parts = [self._concat_part(node, t, axis) for t in node.inputs]
        self.track(node.outputs[0], axis, np.concatenate(parts))

    def _concat_part(self, node: gs.Node, t: gs.Tensor, axis: int) -> np.ndarray:
        """The channel ids one Concat input contributes (fresh barrier ids for an untracked input)."""
        if t.name in self.cg.tensors:
            return self.cg.tensors[t.name][1]
        shape = self.shape(t)
        if shape is None or not isinstance(shape[axis], int):
            raise Unsupported(f"input '{t.name}' has an unknown channel count")
        return self.new_ids(shape[axis], t.name, f"Concat '{self.label(node)}': input '{t.name}' is untracked")

    def _op_Split(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise Unsupported("unknown rank")
        sa = int(node.attrs.get("axis", 0)) % rank
        if sa != axis:
            for t in node.outputs:
                self.track(t, axis, ids)
            return
        bounds = np.cumsum([0] + self._split_sizes(node, len(ids)))
        for k, t in enumerate(node.outputs):
            self.track(t, axis, ids[bounds[k] : bounds[k + 1]])
        self.site("split", node, 1, axis, ids, [int(b) for b in bounds])

    @staticmethod
    def _split_sizes(node: gs.Node, channels: int) -> list[int]:
        """The sizes a Split cuts the channel axis into (attribute, constant input, or even parts)."""
        split = node.attrs.get("split")
        if split is None and len(node.inputs) > 1 and node.inputs[1].name:
            v = const_value(node.inputs[1])
            if v is None:
                raise Unsupported("dynamic split sizes")
            split = v.tolist()
        if split is None:
            n = len(node.outputs)
            if channels % n:
                raise Unsupported("uneven default split")
            split = [channels // n] * n
        return list(split)

    def _op_Slice(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        vals = [const_value(node.inputs[k]) if k < len(node.inputs) and node.inputs[k].name else None for k in range(5)]
        rank = self.rank(node.inputs[0])
        if vals[1] is None or vals[2] is None or rank is None:
            raise Unsupported("dynamic starts/ends")
        axes = [int(a) % rank for a in (vals[3] if vals[3] is not None else range(len(vals[1])))]
        if axis not in axes:
            self.track(node.outputs[0], axis, ids)
            return
        j = axes.index(axis)
        step = int(vals[4][j]) if vals[4] is not None else 1
        if step != 1:
            raise Unsupported("strided slice of the channel axis")
        start, end, _ = slice(int(vals[1][j]), int(vals[2][j])).indices(len(ids))
        self.site("slice", node, j, axis, ids, (start, end))
        self.track(node.outputs[0], axis, ids[start:end])

    def _qdq(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        qa = int(node.attrs.get("axis", 1)) % (rank or 1)
        for k in (1, 2):
            if k < len(node.inputs) and node.inputs[k].name:
                v = const_value(node.inputs[k])
                if v is None:
                    raise Unsupported("dynamic scale/zero point")
                if v.size > 1:
                    if qa != axis:
                        raise Unsupported("per-axis scales on another axis")
                    self.site("const", node, k, 0, ids)
        self.track(node.outputs[0], axis, ids)

    _op_QuantizeLinear = _qdq
    _op_DequantizeLinear = _qdq
