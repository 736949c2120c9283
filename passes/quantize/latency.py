"""Never slower: int8 compute only where onnxruntime runs it faster and fuses it.

Each layer's float and QDQ forms are timed alone (cached by shape) and int8 is kept
only where it is faster beyond the noise (`TimingCache.compare`), layers whose
int8 weight onnxruntime leaves unfused in the whole model stay float, and the
whole float and int8 models are timed (cached by content hash) with layers
dropped until int8 is not slower.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx

from onnxopt.ir.graph import model_hash
from onnxopt.ir.ops import facts
from onnxopt.passes.quantize.dynamic import DYNAMIC
from onnxopt.passes.quantize.optimized import optimized_nodes
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant, apply_qdq, weight_dq_name
from onnxopt.passes.quantize.state import Work, static
from onnxopt.runtime.decide import Comparison
from onnxopt.runtime.timing import TimingCache

UNFUSED = "onnxruntime leaves its int8 weight unfused in this model (dequantized every run)"


def drop_slower_layers(work: Work, layers: dict[str, LayerQuant], acts: dict[str, ActParams]) -> None:
    """Time each layer of `layers` alone in float and int8 (static, and dynamic where `work.dynamic`
    has that form); a form int8 slows is dropped, a layer with no faster form stays float (reported)."""
    for name in list(layers):
        n = work.nodes[name]
        ti = work.info.get(n.input[0])
        shape = ti.shape if ti else None
        row = work.rows[name]
        fast, cmp = faster_in_int8(work, n, layers[name], acts, shape, work.timing)
        row["int8_latency_ratio"] = None if cmp is None else round(cmp.ratio, 3)
        dyn = work.dynamic.pop(name, None)
        if dyn is not None:
            dyn_fast, dyn_cmp = faster_in_int8(work, n, dyn, acts, shape, work.timing)
            row["dynamic_latency_ratio"] = None if dyn_cmp is None else round(dyn_cmp.ratio, 3)
            if dyn_fast and fast:
                work.dynamic[name] = dyn  # both forms pay: `forms.choose_forms` decides
            elif dyn_fast:
                layers[name], fast = dyn, True
        if not fast and cmp is not None:
            verdict = "slower" if cmp.verdict == "slower" else "not faster beyond the noise"
            row.update(int8=False, why=f"int8 {verdict} ({cmp.describe()} float)")
            del layers[name]


def faster_in_int8(
    work: Work,
    n: onnx.NodeProto,
    lq: LayerQuant,
    acts: dict[str, ActParams],
    shape: tuple[int, ...] | None,
    cache: TimingCache,
) -> tuple[bool, Comparison | None]:
    """Time the float and QDQ forms of this layer shape; int8 is kept only where it is faster
    beyond the noise (an undecided comparison keeps the layer float)."""
    if not static(shape):
        return True, None
    float_model = work.layer_model(n, shape)
    lq_local = dataclasses.replace(lq, node=float_model.graph.node[0].name)
    local_acts = {} if lq.form == DYNAMIC else {"x": acts[n.input[0]], "y": acts[n.output[0]]}
    q_model = apply_qdq(float_model, local_acts, [lq_local])
    attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)
    key = json.dumps(
        [
            n.op_type,
            shape,
            list(work.consts[n.input[1]].shape),
            len(n.input) > 2,
            attrs,
            work.act_type,
            lq.axis is not None,
        ]
        + ([lq.form] if lq.form != "qdq" else [])
    )
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    cmp = cache.compare(key, [float_model, q_model], feeds)
    return cmp.surely_below(1.0), cmp


def unfused(work: Work, acts: dict[str, ActParams], layers: list[LayerQuant]) -> list[str]:
    """The layers among `layers` whose weight DequantizeLinear survives onnxruntime's optimization
    of the whole model: no integer kernel took them, so the weight would be dequantized on every
    run (ConvTranspose on the CPU EP; a float-output MatMul before `qdq_tensors` gave every
    MatMul its output Q); a dynamic layer whose MatMulInteger onnxruntime did not fuse with its
    input quantization and output scaling into DynamicQuantizeMatMul / MatMulIntegerToFloat; an
    Attention whose QAttention does not survive as an integer op."""
    optimized = optimized_nodes(work.loaded_form(acts, layers))
    left = {n.name for n in optimized if n.op_type in ("DequantizeLinear", "MatMulInteger")}
    int8_ops = {n.name for n in optimized if facts(n.op_type).integer}
    return [
        lq.node
        for lq in layers
        if (lq.node if lq.form == DYNAMIC else weight_dq_name(lq.node)) in left
        or (facts(work.nodes[lq.node].op_type).dynamic_int8_op and lq.node not in int8_ops)
    ]


def drop_unfused(work: Work, acts: dict[str, ActParams], layers: dict[str, LayerQuant], kept: list[str]) -> list[str]:
    """`kept` less the layers onnxruntime leaves unfused, repeated until none is (a layer kept float
    can leave its neighbours unfused); each one dropped is reported."""
    while kept:
        left = unfused(work, acts, [layers[k] for k in kept])
        if not left:
            break
        for name in left:
            work.rows[name].update(int8=False, why=UNFUSED)
        kept = [k for k in kept if k not in left]
    return kept


def never_slower(
    work: Work,
    acts: dict[str, ActParams],
    layers: dict[str, LayerQuant],
    kept: list[str],
    final: onnx.ModelProto,
    stats: dict,
) -> tuple[onnx.ModelProto, list[str]]:
    """Time the whole float and int8 models (the latter in its `loaded_form`); while int8 is
    slower keep only layers with larger per-layer gains (ratio thresholds 0.8, 0.6), and give
    up on int8 compute if it stays slower (int8 storage alone remains: it is folded at load,
    see `storage_folds`).

    Timings are cached by the content hash of both models, so with a warm cache the same
    choice is made again and the output is byte-identical."""
    cmp = Comparison.exact(1.0, 1.0)
    for limit in (None, 0.8, 0.6):
        if limit is not None:
            kept = _larger_gains(work, layers, kept, limit)
        if not kept:
            break
        chosen = [layers[k] for k in kept]
        cmp = _model_ratio(work, work.loaded_form(acts, chosen), stats)
        if cmp.high <= 1.0:  # not slower beyond the noise either way: undecided keeps float
            stats["latency_ratio"] = round(cmp.ratio, 3)
            return (final if limit is None else work.build(acts, chosen)), kept
    if stats.get("latency_ratio_tries"):
        work.notes.append(f"int8 compute stayed slower than float ({cmp.describe()}): left float")
    for name in kept:
        work.rows[name].update(int8=False, why="whole model slower in int8")
    return (work.build(acts, []) if work.store else work.model), []


def _larger_gains(work: Work, layers: dict[str, LayerQuant], kept: list[str], limit: float) -> list[str]:
    """The layers of `kept` whose int8 form alone ran under `limit` x float; the others are reported."""
    kept = [k for k in kept if (work.rows[k].get("int8_latency_ratio") or 1.0) < limit]
    for name in set(layers) - set(kept):
        if work.rows[name].get("why") is None:
            work.rows[name].update(int8=False, why=f"whole model slower; gain below {limit}")
    return kept


def _model_ratio(work: Work, timed: onnx.ModelProto, stats: dict) -> Comparison:
    """int8 / float run time of the whole model (cached by both models' content), noted in `stats`."""
    key = json.dumps(["model", model_hash(work.model), model_hash(timed)])
    cmp = work.timing.compare(key, [work.model, timed], work.drawn_samples[0], runs=15)
    stats.setdefault("latency_ratio_tries", []).append(round(cmp.ratio, 3))
    return cmp
