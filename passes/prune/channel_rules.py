"""Channel rules of the ops that compute: layers that create or sum channels (Conv, ConvTranspose,
Gemm, MatMul), per-channel ops (normalizations, reductions, softmax, pad, resize).

Each `_op_<Op>` method follows the channels of one node, recording sites and reducers, or raises
`Unsupported` to make its tracked inputs a barrier. The layout rules are in `layout_rules`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.prune.channel_model import Reducer, Unsupported, const_value
from onnxopt.passes.prune.channel_walk import ChannelWalk, weight_axes

#: Ops that keep every channel where it is (elementwise on one dynamic input, pooling, resampling).
UNARY_OPS = frozenset(
    """Relu Clip Sigmoid HardSigmoid HardSwish LeakyRelu Tanh Exp Log Abs Neg Identity Dropout
Cast Erf Sqrt Softplus Softsign Elu Selu Celu Mish Gelu Floor Ceil Round Reciprocal Sign ThresholdedRelu Sin Cos
MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool MaxRoundPool""".split()
)
#: Elementwise ops whose operands broadcast against each other.
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Pow PRelu Sum Max Min Mean Where".split())
REDUCE_OPS = frozenset(
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 "
    "ReduceLogSum ReduceLogSumExp ReduceSumSquare".split()
)


class ComputeRules(ChannelWalk):
    """How channels pass through layers and per-channel ops."""

    # ---- channel-creating / channel-summing ops ----------------------------
    def _op_Conv(self, node: gs.Node) -> None:
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        x = self.tracked_input(node, 0)
        if w is None:
            raise Unsupported("dynamic weights")
        if x is not None and x[0] != 1:
            raise Unsupported("channels not on axis 1")
        in_axis, out_axis = weight_axes(node)
        group = int(node.attrs.get("group", 1))
        cout, cin_g = int(w.shape[out_axis]), int(w.shape[in_axis])
        if group == 1:
            if x is not None:
                self.site("const", node, 1, in_axis, x[1])
            out = self.new_ids(cout, self.label(node))
            self.reducer(node, out, x)
        elif cin_g == 1 and x is not None and len(x[1]) == group:
            out = np.repeat(x[1], cout // group)
            self.site("group", node, -1, 0, x[1])
            self.cg.reducers.append(Reducer(node, out, None, None, depthwise=True))
        else:
            name = f"Conv '{self.label(node)}'"
            if x is not None:
                self.mark(x[1], f"{name}: grouped conv (group={group}) keeps per-group counts equal")
            out = self.new_ids(cout, self.label(node), f"{name}: output of a grouped conv (group={group})")
        self.site("const", node, 1, out_axis, out)
        if len(node.inputs) > 2 and node.inputs[2].name != "":
            if const_value(node.inputs[2]) is None:
                raise Unsupported("dynamic bias")
            self.site("const", node, 2, 0, out)
        self.track(node.outputs[0], 1, out)

    def _op_ConvTranspose(self, node: gs.Node) -> None:
        w = const_value(node.inputs[1])
        x = self.tracked_input(node, 0)
        if w is None or int(node.attrs.get("group", 1)) != 1:
            raise Unsupported("dynamic weights or group != 1")
        if x is not None and x[0] != 1:
            raise Unsupported("channels not on axis 1")
        in_axis, out_axis = weight_axes(node)
        if x is not None:
            self.site("const", node, 1, in_axis, x[1])
        out = self.new_ids(int(w.shape[out_axis]), self.label(node))
        self.site("const", node, 1, out_axis, out)
        if len(node.inputs) > 2 and node.inputs[2].name:
            self.site("const", node, 2, 0, out)
        self.reducer(node, out, x)
        self.track(node.outputs[0], 1, out)

    def _op_Gemm(self, node: gs.Node) -> None:
        b = const_value(node.inputs[1])
        x = self.tracked_input(node, 0)
        if b is None or int(node.attrs.get("transA", 0)):
            raise Unsupported("dynamic B or transA=1")
        if x is not None and x[0] != 1:
            raise Unsupported("channels not on axis 1")
        k_axis, n_axis = weight_axes(node)
        out = self.new_ids(int(b.shape[n_axis]), self.label(node))
        if x is not None:
            self.site("const", node, 1, k_axis, x[1])
        self.site("const", node, 1, n_axis, out)
        if len(node.inputs) > 2 and node.inputs[2].name:
            self._gemm_c(node, out)
        self.reducer(node, out, x)
        self.track(node.outputs[0], 1, out)

    def _gemm_c(self, node: gs.Node, out: np.ndarray) -> None:
        """A Gemm's C is cut with its columns when per-column; a dynamic or per-row C is a barrier."""
        c = const_value(node.inputs[2])
        if c is None:
            self.mark(out, f"Gemm '{self.label(node)}': dynamic C")
        elif c.ndim >= 1 and c.shape[-1] == len(out) and (c.ndim == 1 or c.shape[0] == 1):
            self.site("const", node, 2, c.ndim - 1, out)
        elif c.size != 1:
            self.mark(out, f"Gemm '{self.label(node)}': C is not per-column")

    def _op_MatMul(self, node: gs.Node) -> None:
        b = const_value(node.inputs[1])
        x = self.tracked_input(node, 0)
        rank = self.rank(node.inputs[0])
        if b is None or b.ndim != 2 or (self.tracked_input(node, 1) is not None):
            raise Unsupported("B is not a constant matrix")
        if x is not None and (rank is None or x[0] != rank - 1):
            raise Unsupported("channels not on the last axis")
        in_axis, out_axis = weight_axes(node)
        if x is not None:
            self.site("const", node, 1, in_axis, x[1])
        out = self.new_ids(int(b.shape[out_axis]), self.label(node))
        self.site("const", node, 1, out_axis, out)
        self.reducer(node, out, x)
        if rank is not None:
            self.track(node.outputs[0], rank - 1, out)
        else:
            self.mark(out, f"MatMul '{self.label(node)}': unknown rank")

    # ---- per-channel ops ---------------------------------------------------
    def _norm_params(self, node: gs.Node, indices: range) -> None:
        axis, ids = self.only_first_tracked(node)
        if axis != 1:
            raise Unsupported("channels not on axis 1")
        for k in indices:
            if const_value(node.inputs[k]) is None:
                raise Unsupported("dynamic parameters")
            self.site("const", node, k, 0, ids)
        self.track(node.outputs[0], axis, ids)

    def _op_BatchNormalization(self, node: gs.Node) -> None:
        self._norm_params(node, range(1, 5))

    def _op_InstanceNormalization(self, node: gs.Node) -> None:
        self._norm_params(node, range(1, 3))

    def reduce(self, node: gs.Node) -> None:
        """A Reduce* over other axes keeps the channels (on a moved axis without keepdims)."""
        axis, ids = self.only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        axes = self.constant_axes(node)
        if not axes or rank is None:
            raise Unsupported("reduces over every axis")
        axes = [a % rank for a in axes]
        if axis in axes:
            raise Unsupported("reduces over the channel axis")
        keep = int(node.attrs.get("keepdims", 1))
        self.track(node.outputs[0], axis if keep else axis - sum(a < axis for a in axes), ids)

    def _op_Softmax(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        rank = self.rank(node.inputs[0])
        if rank is None:
            raise Unsupported("unknown rank")
        a = node.attrs.get("axis", -1 if self.graph.opset >= 13 else 1) % rank
        if axis == a or (self.graph.opset < 13 and axis >= a):
            raise Unsupported("normalizes over the channel axis")
        self.track(node.outputs[0], axis, ids)

    _op_LogSoftmax = _op_Softmax

    def _op_Pad(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            v = const_value(node.inputs[1])
            pads = v.tolist() if v is not None else None
        rank = self.rank(node.inputs[0])
        if pads is None or rank is None or len(node.inputs) > 3:
            raise Unsupported("dynamic pads or axes")
        if pads[axis] != 0 or pads[axis + rank] != 0:
            raise Unsupported("pads the channel axis")
        self.track(node.outputs[0], axis, ids)

    def _op_Resize(self, node: gs.Node) -> None:
        axis, ids = self.only_first_tracked(node)
        for k in (1, 2, 3):
            if k < len(node.inputs) and node.inputs[k].name:
                self._resize_input(node, k, axis)
        self.track(node.outputs[0], axis, ids)

    @staticmethod
    def _resize_input(node: gs.Node, k: int, axis: int) -> None:
        """Resize's roi (1), scales (2) or sizes (3) must leave the channel axis alone."""
        v = const_value(node.inputs[k])
        if v is None:
            if k == 1:
                return
            raise Unsupported("dynamic scales/sizes")
        if k == 2 and v.size and v[axis] != 1:
            raise Unsupported("scales the channel axis")
        if k == 3 and v.size:
            raise Unsupported("explicit sizes name the channel count")

    _op_Upsample = _op_Resize

    def _op_PRelu(self, node: gs.Node) -> None:
        self.elementwise(node)
