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

This module runs the walk and registers it as the `channel_groups` analysis; the
result's vocabulary is in `channel_model`, the per-op rules in `channel_rules`
(layers, per-channel ops) and `layout_rules` (layout ops).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo, concrete_input_shapes, infer_tensor_info
from onnxopt.data.observe import with_outputs
from onnxopt.data.samples import model_inputs
from onnxopt.framework.context import PassContext, register_analysis
from onnxopt.ir.graph import export_model
from onnxopt.ir.ops import ops_where
from onnxopt.passes.prune.channel_model import ChannelGroups, Group, Reducer, Site, Unsupported, const_value
from onnxopt.passes.prune.channel_rules import ELEMENTWISE_OPS, REDUCE_OPS, UNARY_OPS, ComputeRules
from onnxopt.passes.prune.layout_rules import LayoutRules
from onnxopt.runtime.sessions import ORT_ERRORS, make_session

#: The name the analysis is registered under (`ctx.analysis(CHANNEL_GROUPS, graph)`).
CHANNEL_GROUPS = "channel_groups"
#: Ops that sum over the channel axis (the end of a channel's path; where compensation goes).
REDUCER_OPS = ops_where("prunable")
#: What a failed onnxruntime run raises (an invalid or unsupported model, a bad feed), and what a
#: feed of the wrong kind raises in numpy: the run was a best-effort source of shapes, so no shapes.
_RUN_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, KeyError, OSError, MemoryError)


class _Builder(ComputeRules, LayoutRules):
    """One walk over a graph in node order, dispatching each node to its `_op_<Op>` rule."""

    def run(self) -> ChannelGroups:
        """Follow every channel from its source to where it is summed or blocked, then form groups."""
        for node in self.graph.nodes:
            tracked = [t for t in node.inputs if t.name in self.cg.tensors]
            if node.op not in REDUCER_OPS and not tracked:
                continue
            try:
                getattr(self, f"_op_{node.op}", self._op_default)(node)
            except Unsupported as exc:
                for t in tracked:
                    self.mark(self.cg.tensors[t.name][1], f"{node.op} '{self.label(node)}': {exc}")
                for t in node.outputs:
                    self.cg.tensors.pop(t.name, None)
        for t in self.graph.outputs:
            if t.name in self.cg.tensors:
                self.mark(self.cg.tensors[t.name][1], f"graph output '{t.name}'")
        self._finish()
        return self.cg

    def _op_default(self, node: gs.Node) -> None:
        if node.op in UNARY_OPS:
            axis, ids = self.only_first_tracked(node)
            self.track(node.outputs[0], axis, ids)
            return
        if node.op in ELEMENTWISE_OPS:
            return self.elementwise(node)
        if node.op in REDUCE_OPS:
            return self.reduce(node)
        raise Unsupported("no channel rule for this op")

    def _op_Shape(self, node: gs.Node) -> None:
        """Shape reads C at run time; it carries no channels."""

    def _finish(self) -> None:
        """Form one group per joined set of sources, with its classes (in id order) and barriers."""
        cg = self.cg
        reasons = self._barrier_reasons()
        members: dict[int, list[int]] = {}
        for s in range(len(cg.src_parent)):
            members.setdefault(self.src_find(s), []).append(s)
        class_order: dict[int, list[int]] = {}
        seen: set[int] = set()
        for i in range(len(cg.parent)):
            r = cg.find(i)
            if r not in seen:
                seen.add(r)
                class_order.setdefault(self.src_find(cg.source_of[i]), []).append(r)
        for root, srcs in sorted(members.items()):
            classes = class_order.get(root, [])
            g = Group(
                name=cg.source_names[srcs[0]],
                sources=[cg.source_names[s] for s in srcs],
                classes=classes,
                barriers=reasons.get(root, []),
            )
            for c in classes:
                cg.class_group[c] = len(cg.groups)
            cg.groups.append(g)

    def _barrier_reasons(self) -> dict[int, list[str]]:
        """Source root -> the distinct barrier reasons marked on its channels (a mark's reason
        carries over to the unnamed marks after it)."""
        cg = self.cg
        reasons: dict[int, list[str]] = {}
        last = ""
        for i, why in cg.barrier_marks:
            last = why or last
            src = self.src_find(cg.source_of[i])
            lst = reasons.setdefault(src, [])
            if last and last not in lst:
                lst.append(last)
        return reasons


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
    missing = [
        o
        for n in model.graph.node
        if n.op_type != "Constant"
        for o in n.output
        if o and (o not in known or known[o].shape is None)
    ]
    if not missing:
        return {}
    try:
        sess = make_session(with_outputs(model, missing), optimize=False)
        feeds = {name: np.zeros(shapes[name], dtype=dt) for name, (dt, _) in model_inputs(model).items()}
        values = sess.run(missing, feeds)
    except _RUN_ERRORS:
        return {}
    return {
        name: TensorInfo(known[name].elem_type if name in known else 0, tuple(np.shape(v)))
        for name, v in zip(missing, values)
    }


@register_analysis(CHANNEL_GROUPS)
def channel_groups_analysis(graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
    """The channel dependency analysis, cached in the pass context."""
    return analyze_channels(graph, ctx.settings.get("input_shapes"))


__all__ = [
    "CHANNEL_GROUPS",
    "ChannelGroups",
    "Group",
    "Site",
    "Reducer",
    "analyze_channels",
    "UNARY_OPS",
    "ELEMENTWISE_OPS",
    "const_value",
]
