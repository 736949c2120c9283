"""Post-training INT8 quantization: calibrated QDQ placement that keeps accuracy and never slows the model.

Weights are int8 symmetric (per output channel), biases int32, activations
uint8 asymmetric (or int8 symmetric). Q/DQ goes only around the MAC layers
(Conv, ConvTranspose, Gemm, MatMul) that onnxruntime's CPU EP turns into
integer kernels, and only where that pays: each layer's float and QDQ forms
are timed on onnxruntime (cached by shape), and layers whose int8 form is
slower stay float. Then each remaining layer is quantized alone to measure
its sensitivity (output SQNR), and the most sensitive ones are kept float
until the whole model meets `target_sqnr`. A layer whose int8 weight
onnxruntime leaves unfused in the whole model (a DequantizeLinear that would
run every time: ConvTranspose on the CPU EP, which has no integer kernel for
it) stays float too. The per-layer trials are
independent and run through the executor in `ctx.settings["executor"]`
(`onnxopt.sensitivity`; None: in this process), with the same results
wherever they run; the search for how many layers to keep float stays serial.

Layers left float (slower in int8, or too sensitive) still store int8
weights (`weight_storage=int8`, the default): the weight is written as
Cast(int8) -> Mul(scales) [-> Reshape], one scale per block of `storage_block`
values of an output channel, which onnxruntime's constant folding
(and OpenVINO's) turns back into a float constant when the session loads, so
the file is about 4x smaller there at no cost per run (a DequantizeLinear
would stay in the graph and run every time). Rounding weights has its own
error budget, `storage_sqnr`: the layers whose rounded weights cost the most
SQNR keep float weights until the int8-stored model reaches it, and
`target_sqnr` then measures the int8 compute layers against that model.

Layers the calibrated path cannot reach still get int8 weight storage, measured
the same way (output SQNR against float, `storage_sqnr`) and reported per layer
with where they live: recurrent layers (LSTM/GRU/RNN, no QDQ integer kernel on
the CPU EP) and MAC layers inside If/Loop/Scan bodies (their activations cannot
be calibrated by adding graph outputs; their weights may live in an outer graph).
Layers that already compute in integers (MatMulInteger, ConvInteger,
DynamicQuantizeLSTM, QLinear*, QDQ) are reported and left alone;
`requantize=true` turns onnxruntime's dynamic MatMulInteger layers back into
float MatMuls and quantizes them with calibration. A run that changes nothing
says why (`PassResult.reason`).

Every decision is reproducible: per-layer and whole-model timings come from
the disk `TimingCache` ($ONNXOPT_CACHE), keyed by layer shape and by the
content hash of the float and int8 models, and calibration statistics are
cached by model and data hash, so the same input, options and cache give
byte-identical output.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import json
import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt import weights
from onnxopt.calibration import activation_histograms, channel_means
from onnxopt.graph import export_model, import_model, model_hash
from onnxopt.model_io import structure_only
from onnxopt.kernels.bias_correction import mean_output_shift
from onnxopt.kernels.bias_guard import bias_safe_weight_scales
from onnxopt.kernels.quant import (BIAS_MIN_SCALE, BiasQuantizationError, all_finite, dequantize, quantize, quantize_bias,
                                   quantize_weight_blocks, quantize_weight_per_channel, quantize_weight_per_tensor,
                                   scale_zero_point, u8s8_saturates)
from onnxopt.kernels.ranges import range_entropy, range_minmax, range_mse, range_percentile
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.qdq import (INT8_STORAGE_MIN_ELEMENTS, MAC_OPS, PASS_THROUGH_OPS, RECURRENT_OPS, ActParams,
                         LayerQuant, WeightStore, apply_qdq, dequantize_dynamic_matmuls, integer_layers,
                         optimized_nodes, optimized_op_types, reduction_axes, single_layer_model, store_weights,
                         walk_graphs, weight_axis, weight_dq_name)
from onnxopt.registry import register_pass
from onnxopt.report import count_reasons
from onnxopt.sensitivity import Trial, output_sqnr, reference_outputs, sensitivity
from onnxopt.shapes import TensorInfo, infer_tensor_info
from onnxopt.stats import model_stats, node_macs
from onnxopt.timing import TimingCache, cpu_info
from onnxopt.weights import has_external, is_external, mapped

METHODS = ("minmax", "percentile", "entropy", "mse")
STORAGE = ("int8", "float")


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (u8s8 dot products without int16 saturation)."""
    return bool(re.search(r"\b(avx512_vnni|avx_vnni)\b", cpu_info().get("flags", "")))


def range_override_problem(text: str) -> str | None:
    """Why a `ranges` entry is not 'tensor=min:max' with finite min <= max, or None if it is."""
    name, _, rng = text.partition("=")
    lo, _, hi = rng.partition(":")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        return "is not 'tensor=min:max'"
    if not name or not (np.isfinite(low) and np.isfinite(high)) or low > high:
        return "needs a tensor name and finite min <= max"
    return None


@register_pass("quantize")
class Quantize(Pass):
    """Calibrated INT8 QDQ quantization, latency- and accuracy-aware, fused by onnxruntime's CPU EP."""

    tolerance = "quantize"
    needs_data = True

    @dataclass
    class Options:
        method: str = option("percentile", "activation range method", choices=METHODS)
        percentile: float = option(99.999, "percentile for method=percentile", above=0, high=100)
        per_channel: bool = option(True, "per-output-channel weight scales (else per tensor)")
        activations: str = option("uint8", "uint8 (asymmetric) or int8 (symmetric) activations",
                                  choices=("uint8", "int8"))
        latency_aware: bool = option(True, "keep a layer float where its int8 form is not faster")
        accuracy_aware: bool = option(True, "keep the most sensitive layers float until target_sqnr is met")
        target_sqnr: float = option(35.0, "model output SQNR (dB) to reach on the calibration samples")
        max_float_layers: int = option(-1, "at most this many layers kept float for accuracy (-1: no limit)", low=-1)
        sensitivity_samples: int = option(8, "calibration samples used for sensitivity and SQNR", low=1)
        vnni: str = option("auto", "target a CPU with VNNI (no: 7-bit weights where u8s8 saturates)",
                           choices=("auto", "yes", "no"))
        op_types: list[str] = option(list(MAC_OPS), "op types to quantize", choices=MAC_OPS)
        include: list[str] = option([], "regexes: only nodes whose name matches one are quantized", kind="regex")
        exclude: list[str] = option([], "regexes: nodes whose name matches one stay float", kind="regex")
        ranges: list[str] = option([], "per-tensor range overrides 'tensor=min:max'", check=range_override_problem)
        cache: bool = option(True, "cache calibration statistics on disk")
        check_latency: bool = option(True, "time the whole float and int8 models (cached) and back off while slower")
        bias_correction: bool = option(False, "subtract the mean output shift of rounded weights from the bias "
                                              "(off: on PP-OCRv4 rec it lowered all-int8 SQNR 22.7 -> 20.5 dB)")
        weight_storage: str = option("int8", "how layers left float store their weights (int8: Cast->Mul that "
                                             "the runtime folds at load; smaller, same speed)", choices=STORAGE)
        storage_block: int = option(32, "stored int8 weights get one scale per this many values of an output "
                                        "channel (0: one per channel)", low=0)
        storage_sqnr: float = option(30.0, "SQNR (dB) against float that int8 weight storage alone must keep; "
                                           "the weights that cost most stay float until it is met")
        requantize: bool = option(False, "turn MatMulInteger layers of onnxruntime's dynamic quantization back "
                                         "into float MatMuls (weights dequantized) and quantize them with calibration")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options  # method and weight_storage were checked when the options were parsed
        data = ctx.require_calibration(self.name)
        model = export_model(graph)
        notes: list[str] = []
        per_channel = opts.per_channel
        if per_channel and _opset(model) < 13:
            model, note = _upgrade_opset(model)
            if note:
                notes.append(note)
                per_channel = False
        requantized, left = [], []
        if opts.requantize:
            model, requantized, left = dequantize_dynamic_matmuls(model)
            if requantized:
                notes.append(f"requantize: {len(requantized)} MatMulInteger layers turned back into float MatMuls")
        work = _Work(model, data, opts, per_channel, notes, ctx.settings.get("executor"))
        final, details, stats, skipped = work.run()
        skipped = skipped + left
        stats["requantized"] = len(requantized)
        if final is work.model and not requantized:
            return PassResult(changed=False, stats=stats, skipped=skipped, details=details,
                              reason=work.noop_reason())
        new = import_model(final)
        graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
        graph.opset, graph.import_domains = new.opset, new.import_domains
        return PassResult(changed=True, stats=stats, skipped=skipped, details=details)


def _fewest_float(limit: int, sqnr_at, target: float) -> int:
    """The fewest layers (at most `limit`) to keep float so that `sqnr_at(k)` reaches `target`,
    by bisection (SQNR grows with k); `limit` when even that falls short."""
    if sqnr_at(0) >= target:
        return 0
    if sqnr_at(limit) < target:
        return limit
    lo, hi = 0, limit  # sqnr_at(lo) < target <= sqnr_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sqnr_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Convert to opset 13 (per-channel DequantizeLinear); on failure keep the model and say why."""
    try:
        converted = onnx.version_converter.convert_version(model, 13)
        onnx.checker.check_model(structure_only(converted))
        return converted, None
    except Exception as exc:  # the converter raises many kinds of errors
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return model, f"opset {_opset(model)} could not be upgraded to 13 ({reason}): per-tensor weights"


class _Constants(collections.abc.Mapping):
    """Initializers and Constant-node values by tensor name.

    Weights staged on disk (big models, `onnxopt.weights`) are memory-mapped afresh on
    each access, so the pages read while quantizing one layer are released with it
    instead of piling up to a second copy of the model; the rest is read once.
    """

    def __init__(self, model: onnx.ModelProto):
        self._protos = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                self._protos[n.output[0]] = n.attribute[0].t
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._protos[name]
        if is_external(t):
            return mapped(t)
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(t)
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self):
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def for_model(self, name: str) -> np.ndarray | onnx.TensorProto:
        """What to put in a new model: the staged tensor itself (no copy), else the array."""
        t = self._protos[name]
        return t if is_external(t) else self[name]


def _same_optimized_graph(a: onnx.ModelProto, b: onnx.ModelProto, subgraphs: bool = False) -> bool:
    """Whether onnxruntime's optimized graphs of `a` and `b` have the same node types (so the
    int8-stored weights of one were folded back into constants at load); `subgraphs`: bodies too."""
    return collections.Counter(optimized_op_types(a, subgraphs=subgraphs)) == \
        collections.Counter(optimized_op_types(b, subgraphs=subgraphs))


def _static(shape: tuple | None) -> bool:
    """Whether `shape` is known and every dimension a positive number (a model of it can run)."""
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Work:
    """One run of the pass over a ModelProto (state shared by the steps)."""

    def __init__(self, model: onnx.ModelProto, data, opts: "Quantize.Options", per_channel: bool,
                 notes: list[str], executor=None):
        self.model, self.data, self.opts, self.per_channel, self.notes = model, data, opts, per_channel, notes
        self.executor = executor
        self.act_type = "int8" if opts.activations == "int8" else "uint8"
        self.vnni = cpu_has_vnni() if opts.vnni == "auto" else opts.vnni in ("yes", "true", "1")
        self.consts = _Constants(model)
        self.big = has_external(model)  # weights staged on disk (`onnxopt.weights`): mind memory
        self.nodes = {n.name: n for n in model.graph.node}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
            for t in n.output:
                self.producer[t] = n
        self.skipped: list[dict[str, str]] = []
        self.rows: dict[str, dict] = {}
        #: Layers that already compute in integers (pre-quantized models): reported, left alone.
        self.already = integer_layers(model)
        self.outside: list[tuple[dict, list[tuple[str, int]]]] = []
        self.cands: list[onnx.NodeProto] = []
        self.samples: list | None = None

    # ---- which layers -------------------------------------------------------------------------
    @property
    def already_main(self) -> set[str]:
        """Names of the main graph's layers that are already int8 (QDQ MAC layers among them)."""
        return {r["node"] for r in self.already if r["where"] == "main graph"}

    def candidates(self) -> list[onnx.NodeProto]:
        """MAC nodes with constant float weights that pass the include/exclude filters."""
        found = []
        for i, n in enumerate(self.model.graph.node):
            if not n.name:
                n.name = f"{n.op_type}_{i}"
            if n.op_type not in self.opts.op_types or n.op_type not in MAC_OPS or n.name in self.already_main:
                continue
            if self.opts.include and not any(re.search(p, n.name) for p in self.opts.include):
                continue
            if any(re.search(p, n.name) for p in self.opts.exclude):
                self.rows[n.name] = {"node": n.name, "op": n.op_type, "int8": False, "why": "excluded"}
                continue
            reason = self._unsupported(n)
            if reason:
                self.skipped.append({"node": n.name, "op": n.op_type, "reason": reason})
                continue
            found.append(n)
        self.nodes = {n.name: n for n in self.model.graph.node}
        return found

    def _unsupported(self, n: onnx.NodeProto) -> str | None:
        if len(n.input) < 2 or n.input[1] not in self.consts:
            return "weight is not a constant" if len(n.input) < 2 or n.input[1] not in self.producer or \
                self.producer[n.input[1]].op_type != "DequantizeLinear" else "weight already int8 (DequantizeLinear)"
        if n.input[0] in self.consts:
            return "input is a constant (fold it first)"
        w = self.consts[n.input[1]]
        if w.dtype != np.float32:
            return f"weight dtype {w.dtype} is not float32"
        if not all_finite(w):
            return "weight holds inf/NaN: kept float"
        if len(n.input) > 2 and n.input[2] and n.input[2] not in self.consts:
            return "bias is not a constant"
        if n.op_type == "MatMul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        if n.op_type == "Gemm" and (_attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0
                                    or _attr(n, "beta", 1.0) != 1.0):
            return "Gemm with transA or alpha/beta != 1"
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] and self.consts[n.input[2]].ndim != 1:
            return "Gemm bias is not 1-D"
        return None

    # ---- activation ranges ----------------------------------------------------------------------
    def act_params(self, layers: list[onnx.NodeProto]) -> dict[str, ActParams]:
        """Scale/zero point of every layer input and output from calibration (pass-through inputs reuse
        the scale of the quantized tensor they come from, so onnxruntime can drop their Q/DQ)."""
        source = {}
        for n in layers:
            t = n.input[0]
            while t in self.producer and self.producer[t].op_type in PASS_THROUGH_OPS \
                    and len(self.consumers.get(t, [])) == 1:
                t = self.producer[t].input[0]
            source[n.input[0]] = t
        tensors = sorted({n.output[0] for n in layers} | set(source.values()) | set(source))
        hists = activation_histograms(self.model, self.data, tensors, cache=self.opts.cache,
                                      desc="quantize: calibrating", shapes=self.shapes, executor=self.executor)
        overrides = {}
        for text in self.opts.ranges:
            name, _, rng = text.partition("=")
            lo, _, hi = rng.partition(":")
            overrides[name] = (float(lo), float(hi))
        params = {}
        for t in tensors:
            lo, hi = overrides.get(t) or self._range(hists[t])
            params[t] = ActParams(*scale_zero_point(lo, hi, self.act_type, symmetric=self.act_type == "int8"))
            self.ranges[t] = (lo, hi)
        for t, src in source.items():
            params[t] = params[src]
        return params

    def _range(self, hist) -> tuple[float, float]:
        m, sym = self.opts.method, self.act_type == "int8"
        if m == "minmax":
            return range_minmax(hist)
        if m == "percentile":
            return range_percentile(hist, self.opts.percentile, symmetric=sym)
        if m == "entropy":
            return range_entropy(hist, symmetric=sym)
        return range_mse(hist, symmetric=sym)

    def input_means(self, layers: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
        """Per-channel means of each layer's input (channel axis 1 for Conv, last for Gemm/MatMul), by node."""
        axes = {n.input[0]: 1 if n.op_type == "Conv" else -1 for n in layers
                if n.op_type in ("Conv", "Gemm", "MatMul")}
        obs = channel_means(self.model, self.data, axes, cache=self.opts.cache, desc="quantize: input means")
        found = {}
        for n in layers:
            o = obs.get(n.input[0])
            m = None if o is None else o.mean
            w = self.consts[n.input[1]]
            need = w.shape[1] * int(_attr(n, "group", 1)) if n.op_type == "Conv" else \
                w.shape[1] if n.op_type == "Gemm" and weight_axis(n) == 0 else w.shape[0]
            if m is not None and m.shape == (need,):
                found[n.name] = m
        return found

    # ---- weights --------------------------------------------------------------------------------
    def quantize_layer(self, n: onnx.NodeProto, x: ActParams) -> LayerQuant | str:
        """Int8 weight (7-bit where u8s8 would saturate on a non-VNNI CPU) and int32 bias, or why not."""
        w = self.consts[n.input[1]]
        axis = weight_axis(n) if self.per_channel else None
        notes = []

        def int8_weights(reduce: bool):
            if axis is None:
                q, s, z = quantize_weight_per_tensor(w, reduce_range=reduce)
                return q, np.asarray(s), np.asarray(z)
            return quantize_weight_per_channel(w, axis, reduce_range=reduce)

        q, s, z = int8_weights(False)
        if not self.vnni and self.act_type == "uint8" and u8s8_saturates(q, reduction_axes(n, w.ndim)):
            q, s, z = int8_weights(True)
            notes.append("7-bit weights (u8s8 saturation without VNNI)")
        bq = bs = None
        has_bias = len(n.input) > 2 and bool(n.input[2])
        mean = self.means.get(n.name)
        if has_bias or (mean is not None and n.op_type in ("Conv", "Gemm")):
            def corrected(q, s):
                """The float bias minus the mean output shift of the rounded weights (bias correction)."""
                bias = self.consts[n.input[2]] if has_bias else np.zeros(w.shape[weight_axis(n)], np.float32)
                if mean is None:
                    return bias
                kind = "conv" if n.op_type == "Conv" else "gemm_t" if weight_axis(n) == 0 else "matmul"
                w_dq = dequantize(q, s, 0, axis=axis)
                shift = mean_output_shift(w, w_dq, mean, kind, int(_attr(n, "group", 1)))
                return (bias - shift).astype(np.float32)

            bias = corrected(q, s)
            try:
                bq, bs = quantize_bias(bias, x.scale, s)
            except BiasQuantizationError as exc:
                s = bias_safe_weight_scales(s, bias, float(x.scale), BIAS_MIN_SCALE)
                qmax = 63 if notes else 127  # notes holds the 7-bit choice made above
                q = np.clip(quantize(w, s, np.zeros(np.shape(s), np.int8), np.int8, axis=axis), -qmax, qmax
                            ).astype(np.int8)
                notes.append(f"weight scales widened on {len(exc.channels)} channel(s) for an int32 bias")
                bias = corrected(q, s)
                try:
                    bq, bs = quantize_bias(bias, x.scale, s)
                except BiasQuantizationError as exc2:
                    return f"bias not representable in int32 ({exc2})"
            if axis is None:
                bs = np.asarray(bs).reshape(())
        return self.held(LayerQuant(n.name, q, np.asarray(s, np.float32), np.asarray(z, np.int8), axis, bq, bs,
                                    notes))

    def stored_layer(self, n: onnx.NodeProto) -> LayerQuant:
        """Int8 storage for a layer kept float (float bias, float compute): blocks of
        `storage_block` values per output channel where the layout allows, else per channel
        (or per tensor)."""
        w = self.consts[n.input[1]]
        axis = weight_axis(n)
        blocks = quantize_weight_blocks(w, axis, self.opts.storage_block) if self.opts.storage_block > 1 else None
        if blocks is not None:
            q, s = blocks
            return self.held(LayerQuant(n.name, q, s, np.zeros((), np.int8), axis, shape=tuple(w.shape)))
        if self.per_channel:
            q, s, z = quantize_weight_per_channel(w, axis)
        else:
            axis = None
            q, s, z = quantize_weight_per_tensor(w)
        return self.held(LayerQuant(n.name, q, np.asarray(s, np.float32), np.asarray(z, np.int8), axis))

    def held(self, lq: LayerQuant) -> LayerQuant:
        """`lq` as kept for the rest of the run: a big model's large int8 weight is parked on disk
        (`weights.park`), so the int8 weights of every layer, kept for the trial models, are not
        resident all at once beside the float weights onnxruntime maps."""
        if self.big and lq.weight_q.nbytes >= weights.SPILL_BYTES:
            lq.weight_q = weights.park(lq.weight_q)
        return lq

    # ---- latency --------------------------------------------------------------------------------
    def layer_model(self, n: onnx.NodeProto, shape: tuple | None) -> onnx.ModelProto:
        """A float model of `n` alone with its weights (staged ones referenced, not copied), input of
        `shape` (None: unknown)."""
        return single_layer_model(n, {k: self.consts.for_model(k) for k in n.input[1:] if k}, shape,
                                  _opset(self.model))

    def faster_in_int8(self, n: onnx.NodeProto, lq: LayerQuant, acts: dict[str, ActParams],
                       shape: tuple[int, ...] | None, cache: TimingCache) -> tuple[bool, float | None]:
        """Time the float and QDQ forms of this layer shape; int8 is kept only where it is faster."""
        if not _static(shape):
            return True, None
        float_model = self.layer_model(n, shape)
        lq_local = dataclasses.replace(lq, node=float_model.graph.node[0].name)
        q_model = apply_qdq(float_model, {"x": acts[n.input[0]], "y": acts[n.output[0]]}, [lq_local])
        attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)
        key = json.dumps([n.op_type, shape, list(self.consts[n.input[1]].shape), len(n.input) > 2, attrs,
                          self.act_type, lq.axis is not None])
        feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        t_float, t_int8 = cache.measure(key, [float_model, q_model], feeds)
        ratio = t_int8 / t_float if t_float > 0 else 1.0
        return ratio < 1.0, ratio

    # ---- accuracy -------------------------------------------------------------------------------
    def qdq_tensors(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> dict[str, ActParams]:
        """The activations that get Q/DQ when `layers` are int8: their inputs, Conv and MatMul outputs
        always (QLinearConv and QLinearMatMul need the Q; onnxruntime's fusion of a QDQ MatMul with
        a float output depends on the graph around it: a MatMul feeding Relu -> MatMul + Add stays
        unfused and dequantizes its weight on every run), Gemm outputs only when every consumer is
        a quantized layer (QGemm has a float output)."""
        kept = {lq.node for lq in layers}
        tensors: dict[str, ActParams] = {}
        for lq in layers:
            n = self.nodes[lq.node]
            tensors[n.input[0]] = acts[n.input[0]]
            out = n.output[0]
            users = self.consumers.get(out, [])
            if n.op_type in ("Conv", "ConvTranspose", "MatMul") or (users and all(u.name in kept for u in users)):
                tensors[out] = acts[out]
        return tensors

    def build(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> onnx.ModelProto:
        """The QDQ model for `layers` (activations from `qdq_tensors`); the stored layers that are not
        among them keep float compute with int8 weights."""
        kept = {lq.node for lq in layers}
        stored = [lq for name, lq in self.store.items() if name not in kept]
        return apply_qdq(self.model, self.qdq_tensors(acts, layers), layers, stored)

    def output_sqnr(self, model: onnx.ModelProto, reference=None) -> float:
        """Mean over the sensitivity samples of the worst output's SQNR (dB) against `reference`
        outputs (default: the float model's)."""
        return output_sqnr(model, self.samples, self.reference if reference is None else reference)

    def choose_storage(self, cands: list[onnx.NodeProto], stats: dict) -> dict[str, LayerQuant]:
        """The layers that store int8 weights when left float: every weight of at least
        INT8_STORAGE_MIN_ELEMENTS, less those onnxruntime would not fold back at load (big models:
        checked here layer by layer, `folding_alone`; others: the whole model in `run`), less
        (accuracy-aware) the ones whose rounding costs most, kept float until the stored model
        alone reaches `storage_sqnr` against float."""
        store = {n.name: self.stored_layer(n) for n in cands
                 if self.consts[n.input[1]].ndim >= 2 and self.consts[n.input[1]].size >= INT8_STORAGE_MIN_ELEMENTS}
        if self.big:
            store = self.folding_alone(store)
        if not store or not self.opts.accuracy_aware:
            return store
        trials = [Trial(name, stored=[lq]) for name, lq in store.items()]
        sens = sensitivity(self.model, self.samples, trials, self.executor, reference=self.reference)
        for name, v in sens.items():
            self.rows[name]["storage_sqnr_db"] = round(v, 2)
        order = sorted(store, key=lambda k: sens[k])

        @functools.lru_cache(maxsize=None)
        def sqnr_at(k: int) -> float:
            return self.output_sqnr(apply_qdq(self.model, {}, [], [store[name] for name in order[k:]])) \
                if k < len(order) else float("inf")

        k = _fewest_float(len(order), sqnr_at, self.opts.storage_sqnr)
        stats["sqnr_storage_db"] = round(sqnr_at(k), 2)
        for name in order[:k]:
            self.rows[name]["weight_storage"] = f"float (rounding alone {sens[name]:.1f} dB)"
        return {name: store[name] for name in order[k:]}

    def layer_sensitivity(self, acts: dict[str, ActParams], layers: dict[str, LayerQuant], names: list[str]
                          ) -> dict[str, float]:
        """Output SQNR (dB) with each of `names` alone in int8 (no weight-only storage elsewhere): one
        independent trial per layer, run by the executor."""
        trials = [Trial(n, self.qdq_tensors(acts, [layers[n]]), [layers[n]]) for n in names]
        return sensitivity(self.model, self.samples, trials, self.executor, reference=self.reference)

    def loaded_form(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> onnx.ModelProto:
        """The int8 model as onnxruntime holds it once loaded: `layers` in QDQ form, the layers that
        only store int8 weights with their float weights, which is what folding at load gives them
        back (`storage_folds`, or `folding_alone` for big models, made sure of that). Checking the
        stored form instead would change nothing per run but, for a big model, cost a session
        that folds every layer at once (about 3x its float weights in memory)."""
        return apply_qdq(self.model, self.qdq_tensors(acts, layers), layers)

    def unfused(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> list[str]:
        """The layers among `layers` whose weight DequantizeLinear survives onnxruntime's optimization
        of the whole model: no integer kernel took them, so the weight would be dequantized on every
        run (ConvTranspose on the CPU EP; a float-output MatMul before `qdq_tensors` gave every
        MatMul its output Q)."""
        left = {n.name for n in optimized_nodes(self.loaded_form(acts, layers)) if n.op_type == "DequantizeLinear"}
        return [lq.node for lq in layers if weight_dq_name(lq.node) in left]

    def never_slower(self, acts, layers, kept, final, stats):
        """Time the whole float and int8 models (the latter in its `loaded_form`); while int8 is
        slower keep only layers with larger per-layer gains (ratio thresholds 0.8, 0.6), and give
        up on int8 compute if it stays slower (int8 storage alone remains: it is folded at load,
        see `storage_folds`).

        Timings are cached by the content hash of both models, so with a warm cache the same
        choice is made again and the output is byte-identical."""
        ratio = 1.0
        for limit in (None, 0.8, 0.6):
            if limit is not None:
                kept = [k for k in kept if (self.rows[k].get("int8_latency_ratio") or 1.0) < limit]
                for name in set(layers) - set(kept):
                    if self.rows[name].get("why") is None:
                        self.rows[name].update(int8=False, why=f"whole model slower; gain below {limit}")
            if not kept:
                break
            chosen = [layers[k] for k in kept]
            timed = self.loaded_form(acts, chosen)
            key = json.dumps(["model", model_hash(self.model), model_hash(timed)])
            t_float, t_int8 = self.timing.measure(key, [self.model, timed], self.samples[0], runs=15)
            ratio = t_int8 / t_float
            stats.setdefault("latency_ratio_tries", []).append(round(ratio, 3))
            if ratio <= 1.0:
                stats["latency_ratio"] = round(ratio, 3)
                return (final if limit is None else self.build(acts, chosen)), kept
        if stats.get("latency_ratio_tries"):
            self.notes.append(f"int8 compute stayed slower than float ({ratio:.2f}x): left float")
        for name in kept:
            self.rows[name].update(int8=False, why="whole model slower in int8")
        return (self.build(acts, []) if self.store else self.model), []

    def storage_folds(self, stored: onnx.ModelProto) -> bool:
        """Whether onnxruntime folds the int8-stored weights of `stored` (the model with the layers of
        `self.store` stored) back into constants at load: its optimized graph has the same node
        types as the float model's."""
        return _same_optimized_graph(stored, self.model)

    def folding_alone(self, store: dict[str, LayerQuant]) -> dict[str, LayerQuant]:
        """The layers of `store` whose int8-stored weight onnxruntime folds back at load, each checked
        in a model of that layer alone (big models: a session over the whole int8-stored model
        would fold every layer at once and hold each one's Cast and Mul outputs together, about 3x
        the float weights). Onnxruntime decides each fold from the node and its constant inputs
        alone (its output size cap included), so the answer is the whole model's, per layer."""
        folds = {}
        for name, lq in store.items():
            n = self.nodes[name]
            info = self.info.get(n.input[0])
            float_layer = self.layer_model(n, info.shape if info and _static(info.shape) else None)
            local = dataclasses.replace(lq, node=float_layer.graph.node[0].name)
            stored_layer = apply_qdq(float_layer, {}, [], [local])
            if _same_optimized_graph(stored_layer, float_layer):
                folds[name] = lq
            else:
                self.rows[name]["weight_storage"] = "float (onnxruntime would not fold int8 storage at load)"
        if len(folds) < len(store):
            self.notes.append(f"onnxruntime does not fold the int8-stored weights of {len(store) - len(folds)} "
                              f"of {len(store)} layers at load here: float weights kept for them")
        return folds

    # ---- layers the calibrated path cannot reach ------------------------------------------------
    def outside_layers(self) -> list[tuple[dict, list[tuple[str, int]]]]:
        """Layers that can only get int8 weight storage, with their (weight tensor, output-channel axis)
        pairs: recurrent layers (LSTM/GRU/RNN: no int8 kernel fuses from QDQ on the CPU EP) anywhere,
        and MAC layers inside If/Loop/Scan bodies, whose activations cannot be calibrated by adding
        graph outputs. A weight defined in an outer graph is found through the scopes (outer-scope
        reference). Layers whose weights are not constants go to the skipped list, with why."""
        found = []
        for g, where, scopes in walk_graphs(self.model.graph):
            body = where != "main graph"
            for n in g.node:
                recurrent = n.op_type in RECURRENT_OPS
                if not recurrent and not (body and n.op_type in MAC_OPS and n.op_type in self.opts.op_types):
                    continue
                if self.opts.include and not any(re.search(p, n.name) for p in self.opts.include):
                    continue
                row = {"node": n.name, "op": n.op_type, "where": where, "int8": False}
                if any(re.search(p, n.name) for p in self.opts.exclude):
                    self.rows[n.name] = {**row, "why": "excluded"}
                    continue
                idx = RECURRENT_OPS[n.op_type] if recurrent else (1,)
                axis = 1 if recurrent else weight_axis(n)
                weights, why = [], None
                for i in idx:
                    t = n.input[i] if i < len(n.input) else ""
                    value = next((sc[t] for sc in scopes if t in sc), None)
                    if value is None:
                        why = f"weight '{t}' is computed, not a constant"
                    elif value.data_type != onnx.TensorProto.FLOAT:
                        why = f"weight '{t}' is {onnx.helper.tensor_dtype_to_np_dtype(value.data_type)}, not float32"
                    elif value.data_location != onnx.TensorProto.EXTERNAL \
                            and not all_finite(onnx.numpy_helper.to_array(value)):
                        why = f"weight '{t}' holds inf/NaN: kept float"
                    else:
                        weights.append((t, axis))
                if why:
                    self.skipped.append({"node": n.name, "op": n.op_type, "reason": f"{where}: {why}"})
                    continue
                row["why"] = (f"inside {where}: its activations cannot be calibrated, int8 compute not tried"
                              if body else f"no int8 {n.op_type} kernel from QDQ on the CPU EP")
                found.append((row, weights))
        return found

    def weight_array(self, tensor: str) -> np.ndarray:
        """A constant's value, wherever in the model (main graph or a body) it is defined."""
        if tensor in self.consts:
            return self.consts[tensor]
        for _, _, scopes in walk_graphs(self.model.graph):
            if tensor in scopes[0]:
                return numpy_helper.to_array(scopes[0][tensor])
        raise KeyError(tensor)

    def weight_store(self, tensor: str, axis: int) -> WeightStore:
        """Int8 storage of a weight: blocks of `storage_block` values of each output channel where the
        layout allows (a recurrent [directions, gates*hidden, inputs] weight as a matrix of its rows),
        else one scale per output channel."""
        w = self.weight_array(tensor)
        flat, faxis = (w.reshape(-1, w.shape[-1]), 0) if w.ndim == 3 and axis == 1 else (w, axis)
        blocks = quantize_weight_blocks(flat, faxis, self.opts.storage_block) if self.opts.storage_block > 1 else None
        if blocks is not None:
            return WeightStore(tensor, blocks[0], blocks[1], tuple(w.shape))
        q, s, _ = quantize_weight_per_channel(w, axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        return WeightStore(tensor, q, np.asarray(s, np.float32).reshape(shape))

    def ensure_reference(self) -> None:
        """The sensitivity samples and the float model's outputs on them (computed once)."""
        if self.samples is None:
            self.samples = [s for _, s in zip(range(max(1, self.opts.sensitivity_samples)), self.data)]
            self.reference = reference_outputs(self.model, self.samples)

    def store_outside(self, final: onnx.ModelProto, stats: dict) -> onnx.ModelProto:
        """`final` with int8 storage for the weights of `self.outside` (recurrent layers, layers inside
        bodies), measured like the rest: each weight's rounding alone (output SQNR against float),
        then the weights that cost most stay float until the model with all of them stored reaches
        `storage_sqnr`; kept only if onnxruntime folds every stored weight back at load (bodies
        included), else said so per layer."""
        if not self.outside:
            return final
        stores: dict[str, WeightStore] = {}
        for row, ws in self.outside:
            self.rows[row["node"]] = row
            if self.opts.weight_storage != "int8":
                row["weight_storage"] = "float (weight_storage=float)"
                continue
            small = [t for t, _ in ws if self.weight_array(t).size < INT8_STORAGE_MIN_ELEMENTS]
            if small:
                row["weight_storage"] = f"float (fewer than {INT8_STORAGE_MIN_ELEMENTS} values)"
                continue
            for t, axis in ws:
                if t not in stores:
                    stores[t] = self.weight_store(t, axis)
        if not stores:
            return final
        self.ensure_reference()
        alone = {t: self.output_sqnr(store_weights(self.model, [st])) for t, st in stores.items()}
        order = sorted(stores, key=lambda t: alone[t])

        @functools.lru_cache(maxsize=None)
        def sqnr_at(k: int) -> float:
            return self.output_sqnr(store_weights(self.model, [stores[t] for t in order[k:]])) \
                if k < len(order) else float("inf")

        k = _fewest_float(len(order) if self.opts.accuracy_aware else 0, sqnr_at, self.opts.storage_sqnr)
        chosen = set(order[k:])
        folds = bool(chosen) and _same_optimized_graph(
            store_weights(self.model, [stores[t] for t in order[k:]]), self.model, subgraphs=True)
        if chosen and not folds:
            self.notes.append("onnxruntime does not fold the int8-stored weights of recurrent or control-flow "
                              "layers at load here: float weights kept for them")
        for row, ws in self.outside:
            if "weight_storage" in row:
                continue
            row["storage_sqnr_db"] = round(min(alone[t] for t, _ in ws), 2)
            if not chosen:
                row["weight_storage"] = "float (no weight met storage_sqnr)"
            elif not folds:
                row["weight_storage"] = "float (onnxruntime would not fold int8 storage at load)"
            elif all(t in chosen for t, _ in ws):
                row["weight_storage"] = "int8"
            else:
                row["weight_storage"] = f"float (rounding alone {row['storage_sqnr_db']:.1f} dB)"
        if not chosen or not folds:
            return final
        stats["outside_int8_stored_layers"] = sum(r.get("weight_storage") == "int8" for r, _ in self.outside)
        stats["sqnr_outside_storage_db"] = round(sqnr_at(k), 2)
        return store_weights(final, [stores[t] for t in order[k:]])

    def noop_reason(self) -> str:
        """Why the pass left the model as it was: one line for the report."""
        parts = []
        if not self.cands:
            why = count_reasons(self.skipped, limit=3)
            parts.append("no quantizable layer in the main graph" + (f" ({why})" if why else ""))
        else:
            rows = [self.rows[n.name] for n in self.cands if n.name in self.rows]
            parts.append(f"kept all {len(self.cands)} layers float: {count_reasons(rows, 'why', 3)}")
        if self.already:
            names = ", ".join(r["node"] for r in self.already[:4]) + (", ..." if len(self.already) > 4 else "")
            redo = sum(r["op"] == "MatMulInteger" for r in self.already) if not self.opts.requantize else 0
            parts.append(f"already int8: {len(self.already)} layers ({names})"
                         + (f"; quantize{{requantize=true}} requantizes {redo} MatMulInteger layers with "
                            "calibration" if redo else ""))
        if self.outside:
            rows = [r for r, _ in self.outside]
            where = sorted({r["where"] for r in rows})
            parts.append(f"{len(rows)} recurrent or control-flow layers ({', '.join(where[:3])}"
                         f"{', ...' if len(where) > 3 else ''}) could only store int8 weights: "
                         f"{count_reasons(rows, 'weight_storage', 2)}")
        return "; ".join(parts)

    # ---- the pass -------------------------------------------------------------------------------
    def run(self):
        self.ranges: dict[str, tuple[float, float]] = {}
        cands = self.cands = self.candidates()
        self.outside = self.outside_layers()
        stats: dict = {"candidates": len(cands), "method": self.opts.method, "per_channel": self.per_channel,
                       "activations": self.act_type, "vnni": self.vnni, "notes": self.notes,
                       "already_int8": len(self.already), "outside_layers": len(self.outside)}
        for r in self.already:
            redo = " (requantize=true redoes it with calibration)" \
                if r["op"] == "MatMulInteger" and not self.opts.requantize else ""
            self.rows[r["node"]] = {**r, "int8": True, "already_int8": True,
                                    "why": f"already int8 ({r['op']}): left as it is{redo}"}
        if not cands:
            final = self.store_outside(self.model, stats)
            if final is not self.model:
                stats["output_sqnr_db"] = round(self.output_sqnr(final), 2)
            return final, list(self.rows.values()), stats, self.skipped
        first = next(iter(self.data))
        shapes = {k: tuple(v.shape) for k, v in first.items()}
        info = self.info = infer_tensor_info(self.model, shapes)
        macs = dict(model_stats(self.model, shapes).macs_by_node)
        self.shapes: dict[str, tuple[int, ...]] = {}
        acts = self.act_params(cands)
        for t, shp in self.shapes.items():  # observed shapes beat static inference (dynamic reshapes)
            info[t] = TensorInfo(onnx.TensorProto.FLOAT, shp)
        for n in self.model.graph.node:
            if n.op_type in MAC_OPS and (macs.get(n.name) or 0) <= 0:
                macs[n.name] = node_macs(n, info) or 0
        self.means = self.input_means(cands) if self.opts.bias_correction else {}
        layers: dict[str, LayerQuant] = {}
        for n in cands:
            row = self.rows.setdefault(n.name, {"node": n.name, "op": n.op_type, "macs": int(macs.get(n.name) or 0)})
            row.update({"input_scale": float(acts[n.input[0]].scale), "output_scale": float(acts[n.output[0]].scale),
                        "input_range": self.ranges.get(n.input[0])})
            lq = self.quantize_layer(n, acts[n.input[0]])
            if isinstance(lq, str):
                row.update(int8=False, why=lq)
                continue
            row["weight_scale"] = [float(np.min(lq.weight_scale)), float(np.max(lq.weight_scale))]
            if lq.notes:
                row["notes"] = lq.notes
            layers[n.name] = lq
        self.timing = TimingCache("quantize")
        if self.opts.latency_aware:
            cache = self.timing
            for name in list(layers):
                n = self.nodes[name]
                ti = info.get(n.input[0])
                fast, ratio = self.faster_in_int8(n, layers[name], acts, ti.shape if ti else None, cache)
                self.rows[name]["int8_latency_ratio"] = None if ratio is None else round(ratio, 3)
                if not fast:
                    self.rows[name].update(int8=False, why=f"int8 slower ({ratio:.2f}x float)")
                    del layers[name]
        self.ensure_reference()
        self.store: dict[str, LayerQuant] = {}
        compute_ref = self.reference
        if self.opts.weight_storage == "int8":
            self.store = self.choose_storage(cands, stats)
            stored_only = self.build(acts, []) if self.store else self.model
            if self.store and not self.big and not self.storage_folds(stored_only):
                self.notes.append("onnxruntime does not fold the int8-stored weights at load here: float weights kept")
                self.store = {}
            elif self.store:  # int8 compute is judged against the int8-stored model: storage has its own budget
                compute_ref = reference_outputs(stored_only, self.samples)
        kept = list(layers)
        if self.opts.accuracy_aware and layers:
            sens = self.layer_sensitivity(acts, layers, kept)
            for name in kept:
                self.rows[name]["sensitivity_sqnr_db"] = round(sens[name], 2)
            order = sorted(kept, key=lambda k: sens[k])
            limit = len(order) if self.opts.max_float_layers < 0 else min(self.opts.max_float_layers, len(order))

            @functools.lru_cache(maxsize=None)
            def sqnr_with_float(k: int) -> float:
                return self.output_sqnr(self.build(acts, [layers[x] for x in order[k:]]), compute_ref) \
                    if k < len(order) else float("inf")

            k = _fewest_float(limit, sqnr_with_float, self.opts.target_sqnr)
            for name in order[:k]:
                self.rows[name].update(int8=False, why=f"sensitive (alone {sens[name]:.1f} dB)")
            kept = order[k:]
            stats["sqnr_all_int8_db"] = round(sqnr_with_float(0), 2)
        while kept and self.opts.latency_aware:  # a layer kept float can leave its neighbours unfused
            unfused = self.unfused(acts, [layers[k] for k in kept])
            if not unfused:
                break
            for name in unfused:
                self.rows[name].update(int8=False, why="onnxruntime leaves its int8 weight unfused in this model "
                                                       "(dequantized every run)")
            kept = [k for k in kept if k not in unfused]
        final = self.build(acts, [layers[k] for k in kept]) if kept or self.store else self.model
        if kept and self.opts.check_latency:
            final, kept = self.never_slower(acts, layers, kept, final, stats)
        for name in kept:
            self.rows[name].update(int8=True, why="faster and accurate enough" if self.opts.latency_aware
                                   else "quantized")
        stored = [name for name in self.store if name not in kept]
        for name in stored:
            self.rows[name]["weight_storage"] = "int8"
        total = sum(int(macs.get(n.name) or 0) for n in cands) or 1
        all_macs = sum(int(v or 0) for k, v in macs.items()
                       if k in self.nodes and self.nodes[k].op_type in MAC_OPS) or 1
        int8_macs = sum(int(macs.get(k) or 0) for k in kept)
        stats.update(int8_layers=len(kept), float_layers=len(cands) - len(kept),
                     int8_mac_share=round(int8_macs / all_macs, 4), int8_candidate_mac_share=round(int8_macs / total, 4))
        stats["int8_stored_layers"] = len(stored)
        final = self.store_outside(final, stats)
        if final is not self.model:
            stats["output_sqnr_db"] = round(self.output_sqnr(final), 2)
        return final, list(self.rows.values()), stats, self.skipped
