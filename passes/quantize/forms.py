"""Which int8 form each MatMul computes in: static QDQ (calibrated activation scales) or dynamic
(its input quantized per run, `dynamic.py`), chosen per layer by measured latency and error.

Static QDQ needs one calibrated scale for the layer's input and output; on transformer encoders
the inputs of the MatMuls are LayerNormalization and GELU outputs whose outlier channels that
one scale rounds away (paraphrase-MiniLM-L3: a static FFN output layer alone costs the model
11 dB of output SQNR). The dynamic form takes each run's own range and keeps a float output, so
no Q/DQ touches the LayerNormalization, Softmax, GELU and residual Add around it. Both forms
are timed alone (`latency.drop_slower_layers`) and measured alone (one sensitivity trial
each); a layer keeps the static form only where it is faster and about as accurate, and next to
an op that keeps float inputs and outputs (`keep_float_io` in the op table) only where it is
measured at least as accurate.
"""

from __future__ import annotations

import onnx

from onnxopt.ir.ops import facts, ops_where, out_channel_axis
from onnxopt.passes.quantize.dynamic import DYNAMIC
from onnxopt.passes.quantize.layer_weights import held, int8_weight
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant
from onnxopt.passes.quantize.search import layer_sensitivity
from onnxopt.passes.quantize.state import Work

#: dB of output SQNR a faster static layer may give up against its dynamic form.
STATIC_SLACK_DB = 1.0


def dynamic_forms(work: Work, layers: dict[str, LayerQuant]) -> None:
    """The dynamic form of every MatMul of `layers` (int8 weight per output column, 7-bit where a
    uint8 input saturates u8s8 without VNNI: DynamicQuantizeLinear is always uint8): in
    `work.dynamic` as an alternative (`matmul_form=auto`), or in `layers` itself (`dynamic`)."""
    form = work.opts.matmul_form
    if form == "static":
        return
    for name, lq in list(layers.items()):
        n = work.nodes[name]
        if n.op_type != "MatMul":
            continue
        q, s, z, notes = int8_weight(work, n, u8_inputs=True)
        dyn = held(work, LayerQuant(name, q, s, z, lq.axis, notes=notes, form=DYNAMIC))
        if form == "dynamic":
            layers[name] = dyn
        else:
            work.dynamic[name] = dyn


def int8_op_form(work: Work, n: onnx.NodeProto) -> LayerQuant:
    """The only int8 form of an op with a `dynamic_int8_op` (Attention -> QAttention, as
    onnxruntime's quantize_dynamic writes it): its input quantized per run (uint8), its weight
    int8 per output column (7-bit where u8s8 would saturate without VNNI), its float bias kept."""
    q, s, z, notes = int8_weight(work, n, u8_inputs=True)
    return held(work, LayerQuant(n.name, q, s, z, out_channel_axis(n), notes=notes, form=DYNAMIC))


def form_name(lq: LayerQuant) -> str:
    """How the report names the form of `lq`: "static" (QDQ) or "dynamic"."""
    return "dynamic" if lq.form == DYNAMIC else "static"


def choose_forms(work: Work, acts: dict[str, ActParams], layers: dict[str, LayerQuant]) -> None:
    """For each layer with both forms faster than float, keep the one to use in `layers` and say
    why in its row (`form`, `form_why`, both SQNRs); a layer with one form says which."""
    both = [name for name in layers if name in work.dynamic]
    static_sqnr = layer_sensitivity(work, acts, layers, both)
    dynamic_sqnr = layer_sensitivity(work, acts, work.dynamic, both)
    for name, lq in layers.items():
        row = work.rows[name]
        if name not in work.dynamic:
            op = work.nodes[name].op_type
            if op == "MatMul":
                row["form_why"] = f"only the {form_name(lq)} form is faster than float (or allowed)"
            elif facts(op).dynamic_int8_op:
                row["form_why"] = f"{facts(op).dynamic_int8_op}: its only int8 form (input quantized per run)"
            continue
        st, dy = static_sqnr[name], dynamic_sqnr[name]
        row.update(static_sqnr_db=round(st, 2), dynamic_sqnr_db=round(dy, 2))
        row["form_why"] = _choose(work, name, layers, st, dy)


def _choose(work: Work, name: str, layers: dict[str, LayerQuant], st: float, dy: float) -> str:
    """Keep the static or the dynamic form of layer `name` in `layers`; why, for its row.

    Timed (`latency_aware`): static where it is faster and within STATIC_SLACK_DB of dynamic
    (no slack next to a `keep_float_io` op). Untimed: static, as the pass always wrote it, except
    next to a `keep_float_io` op where dynamic is measured more accurate."""
    row = work.rows[name]
    guarded = _next_to_float_io(work, name)
    near = f" next to {guarded}" if guarded else ""
    rs: float | None = row.get("int8_latency_ratio")
    rd: float | None = row.get("dynamic_latency_ratio")
    if rs is not None and rd is not None:
        if rs < rd and st >= dy - (0.0 if guarded else STATIC_SLACK_DB):
            return f"static faster and as accurate{near} ({st:.1f} vs {dy:.1f} dB alone)"
        layers[name] = work.dynamic[name]
        if rd <= rs:
            return f"dynamic faster ({rd:.2f}x vs {rs:.2f}x float; {dy:.1f} vs {st:.1f} dB alone)"
    elif not (guarded and dy > st):
        return f"static (not timed; {st:.1f} vs {dy:.1f} dB alone)"
    layers[name] = work.dynamic[name]
    return f"dynamic more accurate{near} ({dy:.1f} vs {st:.1f} dB alone)"


def _next_to_float_io(work: Work, name: str) -> str:
    """The op type next to layer `name` (its input's producer, through ops that only move values,
    or a reader of its output) that keeps float inputs and outputs; "" when none."""
    n = work.nodes[name]
    pass_through = ops_where("pass_through")
    t = n.input[0]
    while t in work.producer and work.producer[t].op_type in pass_through:
        t = work.producer[t].input[0]
    near = [work.producer[t]] if t in work.producer else []
    near += work.consumers.get(n.output[0], [])
    return next((m.op_type for m in near if facts(m.op_type).keep_float_io), "")
