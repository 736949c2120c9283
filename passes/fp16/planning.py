"""Choose the nodes that compute in float16: eligible by schema, kept float32 by measured range and error.

Three measured reasons keep a node float32, each from the calibration data:

1. range: a tensor it reads or writes reaches a magnitude that float16 cannot
   hold with the headroom asked for (exact min/max from the streamed
   histograms the quantizer also uses, `onnxopt.data.calibration`); a weight
   that overflows or rounds below the SQNR limit;
2. missing kernel: onnxruntime refuses the candidate model because no kernel
   of the node's op takes float16 (read from its error, node by node);
3. error: with float16 storage emulated (`measure.emulated`), the node's output SQNR against the float model falls
   below the limit while all its inputs are still above it (`measure`): the
   node is where precision is lost, so it goes back to float32 and the
   candidate is measured again, for a bounded number of rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxopt.data.calibration import activation_histograms
from onnxopt.data.samples import Sample
from onnxopt.ir.graph import constant_value, is_constant
from onnxopt.kernels.fp16 import cast_sqnr_db, fits_fp16
from onnxopt.runtime.sessions import make_session

from .eligibility import FLOAT
from .measure import emulated, missing_kernel, tensor_sqnr


@dataclass
class Plan:
    """The float16 nodes ({name: converted input positions}) and the nodes kept float32, with reasons."""

    half: dict[str, tuple[int, ...]]
    kept: dict[str, str] = field(default_factory=dict)
    rounds: int = 0

    def keep(self, name: str, why: str) -> None:
        """Move node `name` back to float32 for reason `why` (the first reason is kept)."""
        if name in self.half:
            del self.half[name]
            self.kept.setdefault(name, why)


def _activation_inputs(graph: gs.Graph, plan: Plan, types: dict[str, int]) -> dict[str, list[str]]:
    """{tensor name: half-node readers at converted positions} for float32 non-constant tensors."""
    readers: dict[str, list[str]] = {}
    for node in graph.nodes:
        for i in plan.half.get(node.name, ()):
            t = node.inputs[i] if i < len(node.inputs) else None
            if t is not None and t.name and types.get(t.name) == FLOAT and not is_constant(t):
                readers.setdefault(t.name, []).append(node.name)
    return readers


def keep_by_range(
    graph: gs.Graph,
    plan: Plan,
    types: dict[str, int],
    model: onnx.ModelProto,
    data: Iterable[Sample],
    headroom: float,
    cache: bool,
) -> None:
    """Keep float32 every node that reads or writes a tensor whose calibrated range overflows float16."""
    readers = _activation_inputs(graph, plan, types)
    writers = {
        t.name: n.name for n in graph.nodes if n.name in plan.half for t in n.outputs if types.get(t.name) == FLOAT
    }
    tensors = sorted(set(readers) | set(writers))
    hists = activation_histograms(model, data, tensors, cache=cache, desc="fp16: ranges") if tensors else {}
    for t in tensors:
        h = hists[t]
        if fits_fp16(h.absmax, headroom) and not h.nonfinite:
            continue
        why = f"range: |{t}| reaches {h.absmax:.4g}, over float16's 65504/{headroom:g}"
        if h.nonfinite:
            why = f"range: {t} holds {h.nonfinite} non-finite values in float32 already"
        for name in readers.get(t, []) + ([writers[t]] if t in writers else []):
            plan.keep(name, why)


def keep_by_weights(graph: gs.Graph, plan: Plan, headroom: float, min_sqnr_db: float) -> None:
    """Keep float32 every node with a float32 weight that overflows float16 or rounds below `min_sqnr_db`."""
    for node in list(graph.nodes):
        for i in plan.half.get(node.name, ()):
            t = node.inputs[i] if i < len(node.inputs) else None
            value = constant_value(t) if t is not None and is_constant(t) else None
            if t is None or value is None or value.dtype.kind != "f" or value.size == 0:
                continue
            absmax = float(abs(value).max())
            sqnr = cast_sqnr_db(value)
            if not fits_fp16(absmax, headroom):
                plan.keep(node.name, f"weight {t.name}: |w| reaches {absmax:.4g}, over float16's range")
            elif sqnr < min_sqnr_db:
                plan.keep(node.name, f"weight {t.name}: float16 rounding SQNR {sqnr:.1f} dB < {min_sqnr_db:g}")


def refine_by_error(
    graph: gs.Graph,
    plan: Plan,
    model: onnx.ModelProto,
    build: Callable[[dict[str, tuple[int, ...]]], onnx.ModelProto],
    data: Iterable[Sample],
    min_sqnr_db: float,
    rounds: int,
    types: dict[str, int],
) -> None:
    """Build candidates, keep float32 the nodes onnxruntime has no float16 kernel for and the nodes
    where the SQNR first drops below `min_sqnr_db`, until a candidate passes or `rounds` run out."""
    outputs = {n.name: [t.name for t in n.outputs if t.name] for n in graph.nodes}
    inputs = {n.name: [t.name for t in n.inputs if t.name and not is_constant(t)] for n in graph.nodes}
    while plan.half and plan.rounds < rounds:
        candidate = build(dict(plan.half))
        if _keep_missing_kernels(candidate, plan):
            continue  # each try removes one node: bounded by the node count
        plan.rounds += 1
        compared = sorted({t for name in plan.half for t in outputs[name]})
        sqnr = tensor_sqnr(model, emulated(model, plan.half, types), data, compared)
        flagged = _first_losses(plan, outputs, inputs, sqnr, min_sqnr_db)
        for name, why in flagged:
            plan.keep(name, why)
        if not flagged:
            return


def _first_losses(
    plan: Plan,
    outputs: dict[str, list[str]],
    inputs: dict[str, list[str]],
    sqnr: dict[str, float],
    min_sqnr_db: float,
) -> list[tuple[str, str]]:
    """(node, reason) for each float16 node whose output falls below `min_sqnr_db` while every
    activation it reads is still above: where the precision is lost, not where the loss is carried."""
    flagged = []
    for name in sorted(plan.half):
        low = [t for t in outputs[name] if sqnr.get(t, math.inf) < min_sqnr_db]
        if low and all(sqnr.get(t, math.inf) >= min_sqnr_db for t in inputs[name]):
            flagged.append((name, f"error: {low[0]} at {sqnr[low[0]]:.1f} dB SQNR in float16 < {min_sqnr_db:g}"))
    return flagged


def _keep_missing_kernels(candidate: onnx.ModelProto, plan: Plan) -> bool:
    """Keep float32 the node onnxruntime cannot run in float16; True if it found one."""
    try:
        make_session(candidate)
    except Exception as exc:  # onnxruntime's error classes are private; its message names the node
        found = missing_kernel(str(exc))
        if found is None or found[1] not in plan.half:
            raise
        plan.keep(found[1], f"no float16 kernel for {found[0]} in onnxruntime (CPU EP)")
        return True
    return False
