"""The `fp16` pass: float16 compute and weights, float32 inputs and outputs, float32 where measured unsafe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import cleanup, export_model, import_model, subgraphs_of

from .casts import remove_cast_round_trips
from .eligibility import FLOAT16, Eligible, classify
from .planning import Plan, keep_by_range, keep_by_weights, refine_by_error
from .rewrite import convert

#: What the report says on a CPU target: onnxruntime has almost no float16 CPU kernels, so it puts
#: Casts to float32 around the nodes (slower), or with full graph optimization cancels them and
#: runs the model as float32 (no faster): float16 only shrinks the file there.
CPU_NOTE = (
    "float16 is expected slower than float32 on the CPU EP, at best as fast (onnxruntime casts its "
    "nodes back to float32); it pays on openvino GPU or cuda targets"
)


@dataclass
class Float16Options(Pass.Options):
    """Options of the `fp16` pass."""

    headroom: float = option(4.0, "keep float32 where calibrated |x| * headroom > 65504", low=1)
    min_sqnr_db: float = option(40.0, "keep float32 a node whose output SQNR first drops below this", above=0)
    rounds: int = option(3, "measure-and-keep rounds against the float model", low=0)
    cache: bool = option(True, "cache calibration statistics on disk")


@register_pass("fp16")
class Float16(Pass):
    """Convert float32 compute and weights to float16, keeping float32 graph inputs and outputs and
    the nodes whose calibrated ranges overflow float16 or whose measured error is too high."""

    tolerance = "fp16"
    needs_data = True

    Options = Float16Options
    options: Float16Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        data = ctx.require_calibration(self.name)
        info = ctx.analysis("shapes", graph)
        types = {name: ti.elem_type for name, ti in info.items() if ti.elem_type}
        if _converted(graph, types):
            return PassResult(False, reason="the model already holds float16 tensors: converted before, left as is")
        plan, skipped = self._eligible(graph, types)
        if not plan.half:
            return PassResult(False, skipped=skipped, reason="no node computes in float32 with a float16 form")
        o = self.options
        model = export_model(graph)
        keep_by_weights(graph, plan, o.headroom, o.min_sqnr_db)
        keep_by_range(graph, plan, types, model, data, o.headroom, o.cache)

        def build(half: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
            trial = import_model(model)
            convert(trial, half, types)
            remove_cast_round_trips(trial, _elem_type(types))
            cleanup(trial)
            return export_model(trial)

        refine_by_error(graph, plan, model, build, data, o.min_sqnr_db, o.rounds, types)
        ops = {n.name: n.op for n in graph.nodes}
        skipped += [{"node": n, "op": ops[n], "reason": why} for n, why in sorted(plan.kept.items())]
        note = CPU_NOTE if ctx.target == "cpu" else ""
        if not plan.half:
            return PassResult(False, skipped=skipped, reason="every candidate node must stay float32 (see left alone)")
        stats: dict[str, Any] = {"expected": "slower or equal on the CPU EP"} if note else {}
        stats.update(convert(graph, plan.half, types))
        stats["kept_float32"] = len(plan.kept)
        stats["cast_pairs_removed"] = remove_cast_round_trips(graph, _elem_type(types))
        stats["rounds"] = plan.rounds
        return PassResult(True, stats=stats, skipped=skipped, reason=note)

    def _eligible(self, graph: gs.Graph, types: dict[str, int]) -> tuple[Plan, list[dict[str, str]]]:
        """Every main-graph node that can run in float16, and the float32 ones that cannot, with why."""
        opset = int(graph.opset)
        plan = Plan({})
        skipped = []
        for node in graph.nodes:
            verdict = classify(node, opset, types)
            if isinstance(verdict, Eligible):
                plan.half[node.name] = verdict.slots
            elif node.op != "Constant" and (verdict != "no float32 output" or subgraphs_of(node)):
                skipped.append({"node": node.name, "op": node.op, "reason": verdict})
        return plan, skipped


def _elem_type(types: dict[str, int]) -> Any:
    """A tensor's ONNX element type: its own dtype where gs knows it, else the inferred one."""

    def elem_type(t: gs.Tensor) -> int | None:
        if t.dtype is not None:
            try:
                return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)))
            except (TypeError, KeyError):
                pass
        return types.get(t.name)

    return elem_type


def _converted(graph: gs.Graph, types: dict[str, int]) -> bool:
    """Whether some node other than a Cast already computes in float16 (the model was converted)."""
    return any(n.op != "Cast" and any(types.get(t.name) == FLOAT16 for t in n.outputs) for n in graph.nodes)
