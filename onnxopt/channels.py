"""Channel dependency analysis: which channels of which tensors must be removed together.

Every channel created by a weight-carrying node (Conv, ConvTranspose, Gemm,
MatMul with a constant B) gets an integer id. Ids flow through the graph along
a tensor's channel axis: per-channel ops keep them, Concat concatenates them,
Split/Slice cut them, Flatten/Reshape repeat them S times when C merges with a
trailing size S, depthwise convs repeat them k times. Elementwise ops with
several dynamic operands (residual Add, squeeze-excite Mul) join the ids
position by position in a union-find, so a *class* (one union-find root) is the
unit of removal: removing it deletes every position that carries one of its
ids, in every tensor, weight, bias, BN parameter and per-channel constant
(`Site`). A *group* is a set of sources whose channels were joined. Anything the
rules do not understand is a barrier: the ids reaching it are marked and their
group is never pruned; the report names the barrier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import constant_value, export_model
from onnxopt.pass_base import PassContext, register_analysis
from onnxopt.shapes import concrete_input_shapes, infer_tensor_info

#: Ops that keep every channel where it is (elementwise on one dynamic input, pooling, resampling).
UNARY_OPS = frozenset("""Relu Clip Sigmoid HardSigmoid HardSwish LeakyRelu Tanh Exp Log Abs Neg Identity Dropout
Cast Erf Sqrt Softplus Softsign Elu Selu Celu Mish Gelu Floor Ceil Round Reciprocal Sign ThresholdedRelu Sin Cos
MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool MaxRoundPool""".split())
#: Elementwise ops whose operands broadcast against each other.
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Pow PRelu Sum Max Min Mean Where".split())
REDUCE_OPS = frozenset("ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 "
                       "ReduceLogSum ReduceLogSumExp ReduceSumSquare".split())
#: Ops that sum over the channel axis (the end of a channel's path; where compensation goes).
REDUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Site:
    """One place that must be cut when channels are removed.

    kind: "const" (input `index` of `node`, sliced on `axis`), "split" (split
    sizes of a Split), "slice" (starts/ends of a Slice on the channel axis),
    "group" (the `group` attribute of a depthwise conv), "reshape" (entry `axis`
    of a Reshape's shape, = kept positions), "reshape_piece" (entry `axis` of
    the constant input `index` of `node` that feeds a Reshape's computed shape). `ids` are the channel ids along the
    cut axis, one per position.
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    extra: Any = None


@dataclass
class Reducer:
    """A node that creates channels (out) and/or sums over them (in), with its MACs."""

    node: gs.Node
    out_ids: np.ndarray | None
    in_ids: np.ndarray | None
    input_tensor: str | None
    depthwise: bool = False


@dataclass
class Group:
    """Coupled channels: the sources joined by elementwise ops and every class of channels they carry."""

    name: str
    sources: list[str]
    classes: list[int]
    barriers: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.barriers and len(self.classes) > 1


class ChannelGroups:
    """Result of the analysis: union-find over channel ids, groups, sites, reducers, tracked tensors."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.source_of: list[int] = []
        self.src_parent: list[int] = []
        self.source_names: list[str] = []
        self.sites: list[Site] = []
        self.reducers: list[Reducer] = []
        #: tensor name -> (axis, ids) for every tensor that carries tracked channels.
        self.tensors: dict[str, tuple[int, np.ndarray]] = {}
        self.barrier_marks: list[tuple[int, str]] = []
        self.groups: list[Group] = []
        self.class_group: dict[int, int] = {}

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The class (union-find root) of each id."""
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    def keep_mask(self, ids: np.ndarray, removed: set[int]) -> np.ndarray:
        """True for positions whose class is not in `removed`."""
        return np.fromiter((self.find(int(i)) not in removed for i in ids), dtype=bool, count=len(ids))

    def summary(self) -> dict[str, Any]:
        return {"groups": len(self.groups), "prunable_groups": sum(g.prunable for g in self.groups),
                "barrier_groups": sum(bool(g.barriers) for g in self.groups)}


class _Unsupported(Exception):
    """A node the rules cannot follow; its tracked inputs become a barrier."""


class _Builder:
    def __init__(self, graph: gs.Graph, info: dict, pinned: dict) -> None:
        self.graph = graph
        self.info = info
        self.pinned = pinned
        self.cg = ChannelGroups()

    # ---- ids and unions -------------------------------------------------
    def new_ids(self, n: int, source: str, barrier: str | None = None) -> np.ndarray:
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

    def _src_find(self, s: int) -> int:
        p = self.cg.src_parent
        while p[s] != s:
            p[s] = p[p[s]]
            s = p[s]
        return s

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        cg = self.cg
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = cg.find(x), cg.find(y)
            if rx != ry:
                cg.parent[ry] = rx
            sx, sy = self._src_find(cg.source_of[x]), self._src_find(cg.source_of[y])
            if sx != sy:
                cg.src_parent[sy] = sx

    def mark(self, ids: np.ndarray, reason: str) -> None:
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
        s = self.shape(t)
        return len(s) if s is not None else None

    def site(self, kind: str, node: gs.Node, index: int, axis: int, ids: np.ndarray, extra: Any = None) -> None:
        self.cg.sites.append(Site(kind, node, index, axis, np.asarray(ids, dtype=np.int64), extra))

    def track(self, t: gs.Tensor, axis: int, ids: np.ndarray) -> None:
        self.cg.tensors[t.name] = (axis, ids)

    # ---- the walk ---------------------------------------------------------
    def label(self, node: gs.Node) -> str:
        """The node's name, or op and position for unnamed nodes."""
        return node.name or f"{node.op}_{self.position[id(node)]}"

    def run(self) -> ChannelGroups:
        self.position = {id(n): k for k, n in enumerate(self.graph.nodes)}
        for node in self.graph.nodes:
            tracked = [t for t in node.inputs if t.name in self.cg.tensors]
            if node.op not in REDUCER_OPS and not tracked:
                continue
            try:
                getattr(self, f"_op_{node.op}", self._op_default)(node)
            except _Unsupported as exc:
                for t in tracked:
                    self.mark(self.cg.tensors[t.name][1], f"{node.op} '{self.label(node)}': {exc}")
                for t in node.outputs:
                    self.cg.tensors.pop(t.name, None)
        for t in self.graph.outputs:
            if t.name in self.cg.tensors:
                self.mark(self.cg.tensors[t.name][1], f"graph output '{t.name}'")
        self._finish()
        return self.cg

    def _finish(self) -> None:
        cg = self.cg
        reasons: dict[int, list[str]] = {}
        last = ""
        for i, why in cg.barrier_marks:
            last = why or last
            src = self._src_find(cg.source_of[i])
            lst = reasons.setdefault(src, [])
            if last and last not in lst:
                lst.append(last)
        members: dict[int, list[int]] = {}
        for s in range(len(cg.src_parent)):
            members.setdefault(self._src_find(s), []).append(s)
        class_order: dict[int, list[int]] = {}
        seen: set[int] = set()
        for i in range(len(cg.parent)):
            r = cg.find(i)
            if r not in seen:
                seen.add(r)
                class_order.setdefault(self._src_find(cg.source_of[i]), []).append(r)
        for k, (root, srcs) in enumerate(sorted(members.items())):
            classes = class_order.get(root, [])
            g = Group(name=cg.source_names[srcs[0]], sources=[cg.source_names[s] for s in srcs], classes=classes,
                      barriers=reasons.get(root, []))
            for c in classes:
                cg.class_group[c] = len(cg.groups)
            cg.groups.append(g)

    def _in(self, node: gs.Node, k: int = 0) -> tuple[int, np.ndarray] | None:
        if k >= len(node.inputs):
            return None
        return self.cg.tensors.get(node.inputs[k].name)

    def _only_first_tracked(self, node: gs.Node) -> tuple[int, np.ndarray]:
        x = self._in(node, 0)
        if x is None or any(t.name in self.cg.tensors for t in node.inputs[1:]):
            raise _Unsupported("channels reach a non-data input")
        return x

    def _op_default(self, node: gs.Node) -> None:
        if node.op in UNARY_OPS:
            axis, ids = self._only_first_tracked(node)
            self.track(node.outputs[0], axis, ids)
            return
        if node.op in ELEMENTWISE_OPS:
            return self._elementwise(node)
        if node.op in REDUCE_OPS:
            return self._reduce(node)
        raise _Unsupported("no channel rule for this op")

    def _op_Shape(self, node: gs.Node) -> None:
        """Shape reads C at run time; it carries no channels."""

    # ---- channel-creating / channel-summing ops ----------------------------
    def _op_Conv(self, node: gs.Node) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        x = self._in(node, 0)
        name = f"Conv '{self.label(node)}'"
        if w is None:
            raise _Unsupported("dynamic weights")
        if x is not None and x[0] != 1:
            raise _Unsupported("channels not on axis 1")
        group = int(node.attrs.get("group", 1))
        cout, cin_g = int(w.shape[0]), int(w.shape[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2].name != ""
        if group == 1:
            if x is not None:
                self.site("const", node, 1, 1, x[1])
            out = self.new_ids(cout, self.label(node))
            self.cg.reducers.append(Reducer(node, out, x[1] if x is not None else None,
                                            node.inputs[0].name if x is not None else None))
        elif cin_g == 1 and x is not None and len(x[1]) == group:
            k = cout // group
            out = np.repeat(x[1], k)
            self.site("group", node, -1, 0, x[1])
            self.cg.reducers.append(Reducer(node, out, None, None, depthwise=True))
        else:
            if x is not None:
                self.mark(x[1], f"{name}: grouped conv (group={group}) keeps per-group counts equal")
            out = self.new_ids(cout, self.label(node), f"{name}: output of a grouped conv (group={group})")
        self.site("const", node, 1, 0, out)
        if has_bias:
            if const_value(node.inputs[2]) is None:
                raise _Unsupported("dynamic bias")
            self.site("const", node, 2, 0, out)
        self.track(node.outputs[0], 1, out)

    def _op_ConvTranspose(self, node: gs.Node) -> None:
        w = const_value(node.inputs[1])
        x = self._in(node, 0)
        if w is None or int(node.attrs.get("group", 1)) != 1:
            raise _Unsupported("dynamic weights or group != 1")
        if x is not None and x[0] != 1:
            raise _Unsupported("channels not on axis 1")
        if x is not None:
            self.site("const", node, 1, 0, x[1])
        out = self.new_ids(int(w.shape[1]), self.label(node))
        self.site("const", node, 1, 1, out)
        if len(node.inputs) > 2 and node.inputs[2].name:
            self.site("const", node, 2, 0, out)
        self.cg.reducers.append(Reducer(node, out, x[1] if x is not None else None,
                                        node.inputs[0].name if x is not None else None))
        self.track(node.outputs[0], 1, out)

    def _op_Gemm(self, node: gs.Node) -> None:
        b = const_value(node.inputs[1])
        x = self._in(node, 0)
        if b is None or int(node.attrs.get("transA", 0)):
            raise _Unsupported("dynamic B or transA=1")
        if x is not None and x[0] != 1:
            raise _Unsupported("channels not on axis 1")
        tb = int(node.attrs.get("transB", 0))
        k_axis, n_axis = (1, 0) if tb else (0, 1)
        out = self.new_ids(int(b.shape[n_axis]), self.label(node))
        if x is not None:
            self.site("const", node, 1, k_axis, x[1])
        self.site("const", node, 1, n_axis, out)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = const_value(node.inputs[2])
            if c is None:
                self.mark(out, f"Gemm '{self.label(node)}': dynamic C")
            elif c.ndim >= 1 and c.shape[-1] == len(out) and (c.ndim == 1 or c.shape[0] == 1):
                self.site("const", node, 2, c.ndim - 1, out)
            elif c.size != 1:
                self.mark(out, f"Gemm '{self.label(node)}': C is not per-column")
        self.cg.reducers.append(Reducer(node, out, x[1] if x is not None else None,
                                        node.inputs[0].name if x is not None else None))
        self.track(node.outputs[0], 1, out)

    def _op_MatMul(self, node: gs.Node) -> None:
        b = const_value(node.inputs[1])
        x = self._in(node, 0)
        rank = self.rank(node.inputs[0])
        if b is None or b.ndim != 2 or (self._in(node, 1) is not None):
            raise _Unsupported("B is not a constant matrix")
        if x is not None and (rank is None or x[0] != rank - 1):
            raise _Unsupported("channels not on the last axis")
        if x is not None:
            self.site("const", node, 1, 0, x[1])
        out = self.new_ids(int(b.shape[1]), self.label(node))
        self.site("const", node, 1, 1, out)
        self.cg.reducers.append(Reducer(node, out, x[1] if x is not None else None,
                                        node.inputs[0].name if x is not None else None))
        if rank is not None:
            self.track(node.outputs[0], rank - 1, out)
        else:
            self.mark(out, f"MatMul '{self.label(node)}': unknown rank")

    # ---- per-channel ops ---------------------------------------------------
    def _norm_params(self, node: gs.Node, indices: range) -> None:
        axis, ids = self._only_first_tracked(node)
        if axis != 1:
            raise _Unsupported("channels not on axis 1")
        for k in indices:
            if const_value(node.inputs[k]) is None:
                raise _Unsupported("dynamic parameters")
            self.site("const", node, k, 0, ids)
        self.track(node.outputs[0], axis, ids)

    def _op_BatchNormalization(self, node: gs.Node) -> None:
        self._norm_params(node, range(1, 5))

    def _op_InstanceNormalization(self, node: gs.Node) -> None:
        self._norm_params(node, range(1, 3))

    def _elementwise(self, node: gs.Node) -> None:
        ranks = [self.rank(t) for t in node.inputs]
        tracked = [(k, self.cg.tensors[t.name]) for k, t in enumerate(node.inputs) if t.name in self.cg.tensors]
        if any(ranks[k] is None for k, _ in tracked):
            raise _Unsupported("unknown rank")
        from_end = {ranks[k] - ax for k, (ax, _) in tracked}
        if len(from_end) != 1:
            raise _Unsupported("operands carry channels on different axes")
        fe = from_end.pop()
        ref = tracked[0][1][1]
        for k, (ax, ids) in tracked[1:]:
            if len(ids) != len(ref):
                raise _Unsupported("operands disagree on the channel count")
            self.union(ref, ids)
        for k, t in enumerate(node.inputs):
            if t.name in self.cg.tensors:
                continue
            shape = self.shape(t)
            if shape is None:
                raise _Unsupported(f"operand '{t.name}' has an unknown shape")
            pos = len(shape) - fe
            if pos < 0 or shape[pos] == 1:
                continue
            if shape[pos] != len(ref):
                raise _Unsupported(f"operand '{t.name}' does not broadcast on the channel axis")
            if const_value(t) is None:
                raise _Unsupported(f"operand '{t.name}' carries untracked channels")
            self.site("const", node, k, pos, ref)
        out_rank = self.rank(node.outputs[0]) or max(r for r in ranks if r is not None)
        self.track(node.outputs[0], out_rank - fe, ref)

    def _reduce(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            v = const_value(node.inputs[1])
            if v is None:
                raise _Unsupported("dynamic axes")
            axes = v.tolist()
        if not axes or rank is None:
            raise _Unsupported("reduces over every axis")
        axes = [a % rank for a in axes]
        if axis in axes:
            raise _Unsupported("reduces over the channel axis")
        keep = int(node.attrs.get("keepdims", 1))
        self.track(node.outputs[0], axis if keep else axis - sum(a < axis for a in axes), ids)

    def _op_Softmax(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise _Unsupported("unknown rank")
        a = node.attrs.get("axis", -1 if self.graph.opset >= 13 else 1) % rank
        if axis == a or (self.graph.opset < 13 and axis >= a):
            raise _Unsupported("normalizes over the channel axis")
        self.track(node.outputs[0], axis, ids)

    _op_LogSoftmax = _op_Softmax

    def _op_Pad(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            v = const_value(node.inputs[1])
            pads = v.tolist() if v is not None else None
        rank = self.rank(node.inputs[0])
        if pads is None or rank is None or len(node.inputs) > 3:
            raise _Unsupported("dynamic pads or axes")
        if pads[axis] != 0 or pads[axis + rank] != 0:
            raise _Unsupported("pads the channel axis")
        self.track(node.outputs[0], axis, ids)

    def _op_Resize(self, node: gs.Node) -> None:
        axis, ids = self.cg.tensors[node.inputs[0].name] if self._in(node, 0) else (None, None)
        if axis is None or any(t.name in self.cg.tensors for t in node.inputs[1:]):
            raise _Unsupported("channels reach a non-data input")
        for k in (1, 2, 3):
            if k < len(node.inputs) and node.inputs[k].name:
                v = const_value(node.inputs[k])
                if v is None:
                    if k == 1:
                        continue
                    raise _Unsupported("dynamic scales/sizes")
                if k == 2 and v.size and v[axis] != 1:
                    raise _Unsupported("scales the channel axis")
                if k == 3 and v.size:
                    raise _Unsupported("explicit sizes name the channel count")
        self.track(node.outputs[0], axis, ids)

    _op_Upsample = _op_Resize

    def _op_PRelu(self, node: gs.Node) -> None:
        self._elementwise(node)

    # ---- layout ops --------------------------------------------------------
    def _op_Transpose(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        perm = node.attrs.get("perm")
        rank = self.rank(node.inputs[0])
        if perm is None:
            if rank is None:
                raise _Unsupported("unknown rank")
            perm = list(range(rank))[::-1]
        self.track(node.outputs[0], list(perm).index(axis), ids)

    def _axes(self, node: gs.Node) -> list[int] | None:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            v = const_value(node.inputs[1])
            if v is None:
                raise _Unsupported("dynamic axes")
            axes = v.tolist()
        return list(axes) if axes is not None else None

    def _op_Squeeze(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        shape = self.shape(node.inputs[0])
        axes = self._axes(node)
        if shape is None:
            raise _Unsupported("unknown rank")
        if axes is None:
            axes = [k for k, d in enumerate(shape) if d == 1]
        axes = [a % len(shape) for a in axes]
        if axis in axes:
            raise _Unsupported("squeezes the channel axis")
        self.track(node.outputs[0], axis - sum(a < axis for a in axes), ids)

    def _op_Unsqueeze(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        axes = self._axes(node)
        if rank is None or axes is None:
            raise _Unsupported("unknown rank")
        out_rank = rank + len(axes)
        inserted = sorted(a % out_rank for a in axes)
        pos = [k for k in range(out_rank) if k not in inserted]
        self.track(node.outputs[0], pos[axis], ids)

    def _op_Flatten(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        shape = self.shape(node.inputs[0])
        if shape is None:
            raise _Unsupported("unknown shape")
        a = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        if a > axis:
            raise _Unsupported("merges channels into the batch axis")
        sym = self.shape(node.inputs[0], symbolic=True) or ()
        inner, outer = sym[axis + 1:], sym[a:axis]
        if len(sym) != len(shape):
            raise _Unsupported("trailing size is not static")
        if not all(isinstance(d, int) for d in (*inner, *outer)):
            raise _Unsupported("trailing size is not static")
        s, t = int(np.prod(inner)), int(np.prod(outer))
        self.track(node.outputs[0], 1, np.tile(np.repeat(ids, s), t))

    def _op_Reshape(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        xs, ys = self.pshape(node.inputs[0]), self.pshape(node.outputs[0])
        if xs is None or ys is None:
            raise _Unsupported("unknown shapes")
        same_lead = len(ys) > axis and all(a == b and a is not None for a, b in zip(xs[:axis], ys[:axis]))
        if not same_lead:
            raise _Unsupported("reshape moves or splits the channel axis")
        if len(ys) == axis + 1:
            sym = self.shape(node.inputs[0], symbolic=True) or (None,) * len(xs)
            inner = sym[axis + 1:]
            if len(sym) != len(xs) or not all(isinstance(d, int) for d in inner):
                raise _Unsupported("trailing size is not static")
            s = int(np.prod(inner))
        elif ys[axis] == xs[axis] and isinstance(xs[axis], int):
            s = 1
        else:
            raise _Unsupported("reshape splits the channel axis")
        out = np.repeat(ids, s)
        self._shape_entry_site(node, axis, out)
        self.track(node.outputs[0], axis, out)

    def _shape_entry_site(self, node: gs.Node, axis: int, ids: np.ndarray) -> None:
        """Record where the channel entry of a Reshape's target shape lives (constant or a Concat piece)."""
        shape_t = node.inputs[1]
        v = const_value(shape_t)
        if v is not None:
            if int(v[axis]) not in (0, -1):
                self.site("reshape", node, 1, axis, ids)
            return
        src = shape_t
        while src.inputs and src.inputs[0].op in ("Cast", "Identity"):
            src = src.inputs[0].inputs[0]
        p = src.inputs[0] if src.inputs else None
        if p is None or p.op != "Concat":
            raise _Unsupported("target shape computed in a way the rules do not follow")
        offset = 0
        for k, piece in enumerate(p.inputs):
            base, user, slot = piece, p, k
            while base.inputs and base.inputs[0].op in ("Cast", "Identity"):
                user, slot = base.inputs[0], 0
                base = user.inputs[0]
            pv = constant_value(base)
            ps = self.shape(piece)
            n = len(pv.reshape(-1)) if pv is not None else (ps[0] if ps and isinstance(ps[0], int) else None)
            if n is None:
                raise _Unsupported("target shape piece of unknown length")
            if offset <= axis < offset + n:
                if pv is None:
                    raise _Unsupported("channel entry of the target shape is computed at run time")
                if int(pv.reshape(-1)[axis - offset]) not in (0, -1):
                    self.site("reshape_piece", user, slot, axis - offset, ids)
                return
            offset += n
        raise _Unsupported("target shape shorter than expected")

    def _op_Concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0]) or next((self.rank(t) for t in node.inputs if self.rank(t)), None)
        if rank is None:
            raise _Unsupported("unknown rank")
        cat = int(node.attrs["axis"]) % rank
        tracked = [self.cg.tensors[t.name] for t in node.inputs if t.name in self.cg.tensors]
        axes = {a for a, _ in tracked}
        if len(axes) != 1:
            raise _Unsupported("inputs carry channels on different axes")
        axis = axes.pop()
        if cat != axis:
            return self._elementwise(node)
        parts = []
        for t in node.inputs:
            if t.name in self.cg.tensors:
                parts.append(self.cg.tensors[t.name][1])
                continue
            shape = self.shape(t)
            if shape is None or not isinstance(shape[axis], int):
                raise _Unsupported(f"input '{t.name}' has an unknown channel count")
            parts.append(self.new_ids(shape[axis], t.name, f"Concat '{self.label(node)}': input '{t.name}' is untracked"))
        self.track(node.outputs[0], axis, np.concatenate(parts))

    def _op_Split(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        sa = int(node.attrs.get("axis", 0)) % rank
        if sa != axis:
            for t in node.outputs:
                self.track(t, axis, ids)
            return
        split = node.attrs.get("split")
        if split is None and len(node.inputs) > 1 and node.inputs[1].name:
            v = const_value(node.inputs[1])
            if v is None:
                raise _Unsupported("dynamic split sizes")
            split = v.tolist()
        if split is None:
            n = len(node.outputs)
            if len(ids) % n:
                raise _Unsupported("uneven default split")
            split = [len(ids) // n] * n
        bounds = np.cumsum([0] + list(split))
        for k, t in enumerate(node.outputs):
            self.track(t, axis, ids[bounds[k]:bounds[k + 1]])
        self.site("split", node, 1, axis, ids, [int(b) for b in bounds])

    def _op_Slice(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        vals = [const_value(node.inputs[k]) if k < len(node.inputs) and node.inputs[k].name else None
                for k in range(5)]
        rank = self.rank(node.inputs[0])
        if vals[1] is None or vals[2] is None or rank is None:
            raise _Unsupported("dynamic starts/ends")
        axes = [int(a) % rank for a in (vals[3] if vals[3] is not None else range(len(vals[1])))]
        if axis not in axes:
            self.track(node.outputs[0], axis, ids)
            return
        j = axes.index(axis)
        step = int(vals[4][j]) if vals[4] is not None else 1
        if step != 1:
            raise _Unsupported("strided slice of the channel axis")
        start, end, _ = slice(int(vals[1][j]), int(vals[2][j])).indices(len(ids))
        self.site("slice", node, j, axis, ids, (start, end))
        self.track(node.outputs[0], axis, ids[start:end])

    def _qdq(self, node: gs.Node) -> None:
        axis, ids = self._only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        qa = int(node.attrs.get("axis", 1)) % (rank or 1)
        for k in (1, 2):
            if k < len(node.inputs) and node.inputs[k].name:
                v = const_value(node.inputs[k])
                if v is None:
                    raise _Unsupported("dynamic scale/zero point")
                if v.size > 1:
                    if qa != axis:
                        raise _Unsupported("per-axis scales on another axis")
                    self.site("const", node, k, 0, ids)
        self.track(node.outputs[0], axis, ids)

    _op_QuantizeLinear = _qdq
    _op_DequantizeLinear = _qdq


#: Ops evaluated on constants so that e.g. a Reshape of a constant bias counts as a constant.
_CONST_OPS = {
    "Identity": lambda x, *a, **k: x,
    "Cast": lambda x, *a, **k: x,
    "Reshape": lambda x, s, **k: x.reshape([d if d != 0 else x.shape[i] for i, d in enumerate(s.tolist())]),
    "Unsqueeze": lambda x, axes=None, **k: np.expand_dims(x, tuple(k.get("attr_axes") or axes.tolist())),
    "Squeeze": lambda x, axes=None, **k: np.squeeze(x, tuple(k.get("attr_axes") or axes.tolist())),
}


def const_value(t: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """Value of a constant, or of a short Reshape/Unsqueeze/Squeeze/Cast chain over constants."""
    v = constant_value(t)
    if v is not None or depth == 0 or not t.inputs:
        return v
    p = t.inputs[0]
    fn = _CONST_OPS.get(p.op)
    if fn is None or not p.inputs:
        return None
    args = [const_value(i, depth - 1) for i in p.inputs if i.name]
    if any(a is None for a in args):
        return None
    try:
        out = np.asarray(fn(*args, attr_axes=p.attrs.get("axes")))
    except Exception:
        return None
    if p.op == "Cast":
        out = out.astype(onnx.helper.tensor_dtype_to_np_dtype(int(p.attrs["to"])))
    return out


def analyze_channels(graph: gs.Graph, input_shapes: dict | None = None) -> ChannelGroups:
    """Channel groups of `graph` (see the module docstring).

    Shapes come from symbolic inference; where it gives up, from inference at
    concrete input shapes (`input_shapes` or the defaults), which is only used
    for ranks and sizes that do not depend on the input size.
    """
    model = export_model(graph)
    info = infer_tensor_info(model)
    shapes = concrete_input_shapes(model, input_shapes)
    pinned = dict(infer_tensor_info(model, shapes))
    pinned.update(_runtime_shapes(model, shapes, pinned))
    return _Builder(graph, info, pinned).run()


def _runtime_shapes(model: onnx.ModelProto, shapes: dict, known: dict) -> dict:
    """Shapes that inference could not give, read from one onnxruntime run at `shapes` (zeros input)."""
    from onnxopt.calibration import with_outputs
    from onnxopt.data import model_inputs
    from onnxopt.runtime import make_session
    from onnxopt.shapes import TensorInfo

    missing = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output
               if o and (o not in known or known[o].shape is None)]
    if not missing:
        return {}
    try:
        sess = make_session(with_outputs(model, missing), optimize=False)
        feeds = {name: np.zeros(shapes[name], dtype=dt) for name, (dt, _) in model_inputs(model).items()}
        values = sess.run(missing, feeds)
    except Exception:
        return {}
    return {name: TensorInfo(known[name].elem_type if name in known else 0, tuple(np.shape(v)))
            for name, v in zip(missing, values)}


@register_analysis("channel_groups")
def channel_groups_analysis(graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
    """The channel dependency analysis, cached in the pass context."""
    return analyze_channels(graph, ctx.settings.get("input_shapes"))


__all__ = ["ChannelGroups", "Group", "Site", "Reducer", "analyze_channels", "UNARY_OPS", "ELEMENTWISE_OPS", "const_value"]
