"""One run of the quantize pass over a ModelProto, phase by phase.

Select the layers; calibrate their activations; quantize each layer's weights;
drop the layers int8 slows down; choose which float layers store int8 weights;
keep the most sensitive layers float until `target_sqnr`; drop the layers
onnxruntime leaves unfused; time the whole model and back off while it is
slower; store int8 weights of the layers outside the calibrated path. Each
phase is a function below; the state they share is `state.Work`.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.analysis.shapes import TensorInfo, infer_tensor_info
from onnxopt.analysis.stats import model_stats, node_macs
from onnxopt.ir.ops import facts, ops_where
from onnxopt.passes.quantize.activations import act_params, input_means
from onnxopt.passes.quantize.forms import choose_forms, dynamic_forms, form_name, int8_op_form
from onnxopt.passes.quantize.latency import drop_slower_layers, drop_unfused, never_slower
from onnxopt.passes.quantize.layer_weights import quantize_layer
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant
from onnxopt.passes.quantize.search import keep_sensitive_float
from onnxopt.passes.quantize.selection import candidates, integer_layers, outside_layers, report_already
from onnxopt.passes.quantize.state import Row, Work
from onnxopt.passes.quantize.storage import plan_storage, store_outside
from onnxopt.report.tables import count_reasons
from onnxopt.runtime.timing import TimingCache

#: What a run returns: (the model, or the input model itself when nothing changed; report rows; stats; skipped).
Outcome = tuple[onnx.ModelProto, list[Row], dict, list[dict[str, str]]]


def run_work(work: Work) -> Outcome:
    """Quantize `work.model`: every phase in turn (see the module docstring)."""
    work.already = integer_layers(work.model)
    work.cands = candidates(work)
    work.outside = outside_layers(work)
    stats = _opening_stats(work)
    report_already(work)
    if not work.cands:
        return _finish(work, store_outside(work, work.model, stats), stats)
    acts, macs = _calibrate(work)
    layers = _quantize_layers(work, acts, macs)
    dynamic_forms(work, layers)
    work.timing = TimingCache("quantize")
    if work.opts.latency_aware:
        drop_slower_layers(work, layers, acts)
    work.ensure_reference()
    choose_forms(work, acts, layers)
    compute_ref = plan_storage(work, acts, stats)
    kept = list(layers)
    if work.opts.accuracy_aware and layers:
        kept = keep_sensitive_float(work, acts, layers, compute_ref, stats)
    if work.opts.latency_aware:  # a layer kept float can leave its neighbours unfused
        kept = drop_unfused(work, acts, layers, kept)
    final = work.build(acts, [layers[k] for k in kept]) if kept or work.store else work.model
    if kept and work.opts.check_latency:
        final, kept = never_slower(work, acts, layers, kept, final, stats)
    _report_choice(work, [layers[k] for k in kept], macs, stats)
    return _finish(work, store_outside(work, final, stats), stats)


def _opening_stats(work: Work) -> dict:
    """The stats known before any layer is quantized."""
    return {
        "candidates": len(work.cands),
        "method": work.opts.method,
        "per_channel": work.per_channel,
        "activations": work.act_type,
        "vnni": work.vnni,
        "notes": work.notes,
        "already_int8": len(work.already),
        "outside_layers": len(work.outside),
    }


def _calibrate(work: Work) -> tuple[dict[str, ActParams], dict[str, int]]:
    """Activation scales of the candidates from calibration, the tensor shapes (observed shapes beat
    static inference: dynamic reshapes) and the MACs of each layer; input means for bias correction."""
    first = next(iter(work.data))
    shapes = {k: tuple(v.shape) for k, v in first.items()}
    info = work.info = infer_tensor_info(work.model, shapes)
    macs = dict(model_stats(work.model, shapes).macs_by_node)
    work.shapes = {}
    acts = act_params(work, work.cands)
    for t, shp in work.shapes.items():
        info[t] = TensorInfo(onnx.TensorProto.FLOAT, shp)
    quantizable = ops_where("quantizable")
    for n in work.model.graph.node:
        if n.op_type in quantizable and (macs.get(n.name) or 0) <= 0:
            macs[n.name] = node_macs(n, info) or 0
    work.means = input_means(work, work.cands) if work.opts.bias_correction else {}
    return acts, macs


def _quantize_layers(work: Work, acts: dict[str, ActParams], macs: dict[str, int]) -> dict[str, LayerQuant]:
    """The int8 weights of every candidate that has them; each candidate's row says its scales, or
    why it stays float."""
    layers: dict[str, LayerQuant] = {}
    for n in work.cands:
        row = work.rows.setdefault(n.name, {"node": n.name, "op": n.op_type, "macs": int(macs.get(n.name) or 0)})
        row.update(
            {
                "input_scale": float(acts[n.input[0]].scale),
                "output_scale": float(acts[n.output[0]].scale),
                "input_range": work.ranges.get(n.input[0]),
            }
        )
        lq = int8_op_form(work, n) if facts(n.op_type).dynamic_int8_op else quantize_layer(work, n, acts[n.input[0]])
        if isinstance(lq, str):
            row.update(int8=False, why=lq)
            continue
        row["weight_scale"] = [float(np.min(lq.weight_scale)), float(np.max(lq.weight_scale))]
        if lq.notes:
            row["notes"] = lq.notes
        layers[n.name] = lq
    return layers


def _report_choice(work: Work, chosen: list[LayerQuant], macs: dict[str, int], stats: dict) -> None:
    """Mark the int8 layers (with their form) and the int8-stored ones in their rows; the share of
    MACs now int8."""
    kept = [lq.node for lq in chosen]
    why = "faster and accurate enough" if work.opts.latency_aware else "quantized"
    for lq in chosen:
        work.rows[lq.node].update(int8=True, form=form_name(lq), why=f"{why} ({form_name(lq)})")
    stored = [name for name in work.store if name not in kept]
    for name in stored:
        work.rows[name]["weight_storage"] = "int8"
    quantizable = ops_where("quantizable") + ops_where("dynamic_int8_op")
    total = sum(int(macs.get(n.name) or 0) for n in work.cands) or 1
    all_macs = (
        sum(int(v or 0) for k, v in macs.items() if k in work.nodes and work.nodes[k].op_type in quantizable) or 1
    )
    int8_macs = sum(int(macs.get(k) or 0) for k in kept)
    stats.update(
        int8_layers=len(kept),
        float_layers=len(work.cands) - len(kept),
        int8_mac_share=round(int8_macs / all_macs, 4),
        int8_candidate_mac_share=round(int8_macs / total, 4),
    )
    stats["int8_stored_layers"] = len(stored)
    stats["dynamic_layers"] = sum(form_name(lq) == "dynamic" for lq in chosen)


def _finish(work: Work, final: onnx.ModelProto, stats: dict) -> Outcome:
    """The outcome, with the output SQNR of a changed model."""
    if final is not work.model:
        stats["output_sqnr_db"] = round(work.output_sqnr(final), 2)
    return final, list(work.rows.values()), stats, work.skipped


def noop_reason(work: Work) -> str:
    """Why the pass left the model as it was: one line for the report."""
    parts = [_candidates_reason(work)]
    if work.already:
        parts.append(_already_reason(work))
    if work.outside:
        parts.append(_outside_reason(work))
    return "; ".join(parts)


def _candidates_reason(work: Work) -> str:
    """Why no candidate was quantized."""
    if not work.cands:
        why = count_reasons(work.skipped, limit=3)
        return "no quantizable layer in the main graph" + (f" ({why})" if why else "")
    rows = [work.rows[n.name] for n in work.cands if n.name in work.rows]
    return f"kept all {len(work.cands)} layers float: {count_reasons(rows, 'why', 3)}"


def _already_reason(work: Work) -> str:
    """The layers that were int8 already, and how many `requantize=true` would redo."""
    names = ", ".join(r["node"] for r in work.already[:4]) + (", ..." if len(work.already) > 4 else "")
    redo = sum(r["op"] == "MatMulInteger" for r in work.already) if not work.opts.requantize else 0
    hint = f"; quantize{{requantize=true}} requantizes {redo} MatMulInteger layers with calibration" if redo else ""
    return f"already int8: {len(work.already)} layers ({names})" + hint


def _outside_reason(work: Work) -> str:
    """The recurrent and control-flow layers, and how their weights are stored."""
    rows = [r for r, _ in work.outside]
    where = sorted({r["where"] for r in rows})
    return (
        f"{len(rows)} recurrent or control-flow layers ({', '.join(where[:3])}"
        f"{', ...' if len(where) > 3 else ''}) could only store int8 weights: "
        f"{count_reasons(rows, 'weight_storage', 2)}"
    )
