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
(`sensitivity`; None: in this process), with the same results
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

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.onnx_cpp2py_export.checker import ValidationError
from onnx.onnx_cpp2py_export.shape_inference import InferenceError
from onnx.onnx_cpp2py_export.version_converter import ConvertError

from onnxopt.framework.context import PassContext
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.model_io import structure_only
from onnxopt.ir.ops import ops_where
from onnxopt.passes.quantize.boundary import to_proto, write_back
from onnxopt.passes.quantize.phases import noop_reason, run_work
from onnxopt.passes.quantize.requantize import dequantize_dynamic_matmuls
from onnxopt.passes.quantize.smoothing import smooth
from onnxopt.passes.quantize.state import Work, opset
from onnxopt.passes.quantize.summary import summary_line

METHODS = ("minmax", "percentile", "entropy", "mse")
STORAGE = ("int8", "float")
#: The op types the option `op_types` may name (Conv, ConvTranspose, Gemm, MatMul), in table order.
QUANTIZABLE = ops_where("quantizable")
#: What onnx's version converter and the checker after it raise on a model they cannot convert.
_CONVERSION_ERRORS = (ConvertError, ValidationError, InferenceError, RuntimeError, ValueError, IndexError, KeyError)


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

    @classmethod
    def summarize(cls, record: dict) -> str:
        """One terminal line for a run's record (its stats and per-layer rows)."""
        return summary_line(record)

    tolerance = "quantize"
    idempotent = False  # a second run requantizes what its first run left float against new timings
    needs_data = True

    @dataclass
    class Options(Pass.Options):
        method: str = option("percentile", "activation range method", choices=METHODS)
        percentile: float = option(99.999, "percentile for method=percentile", above=0, high=100)
        per_channel: bool = option(True, "per-output-channel weight scales (else per tensor)")
        activations: str = option(
            "uint8", "uint8 (asymmetric) or int8 (symmetric) activations", choices=("uint8", "int8")
        )
        latency_aware: bool = option(True, "keep a layer float where its int8 form is not faster")
        accuracy_aware: bool = option(True, "keep the most sensitive layers float until target_sqnr is met")
        target_sqnr: float = option(35.0, "model output SQNR (dB) to reach on the calibration samples")
        max_float_layers: int = option(-1, "at most this many layers kept float for accuracy (-1: no limit)", low=-1)
        sensitivity_samples: int = option(8, "calibration samples used for sensitivity and SQNR", low=1)
        vnni: str = option(
            "auto", "target a CPU with VNNI (no: 7-bit weights where u8s8 saturates)", choices=("auto", "yes", "no")
        )
        matmul_form: str = option(
            "auto",
            "int8 form of MatMuls with a constant weight: static (QDQ), dynamic (input quantized per "
            "run: DynamicQuantizeLinear + MatMulInteger), auto (per layer, by measured latency and error)",
            choices=("auto", "static", "dynamic"),
        )
        int8_attention: bool = option(
            True,
            "give com.microsoft Attention with a constant weight an int8 form (its input quantized per "
            "run -> QAttention), timed and measured like the other layers",
        )
        op_types: list[str] = option(list(QUANTIZABLE), "op types to quantize", choices=QUANTIZABLE)
        include: list[str] = option([], "regexes: only nodes whose name matches one are quantized", kind="regex")
        exclude: list[str] = option([], "regexes: nodes whose name matches one stay float", kind="regex")
        ranges: list[str] = option([], "per-tensor range overrides 'tensor=min:max'", check=range_override_problem)
        cache: bool = option(True, "cache calibration statistics on disk")
        check_latency: bool = option(True, "time the whole float and int8 models (cached) and back off while slower")
        bias_correction: bool = option(
            False,
            "subtract the mean output shift of rounded weights from the bias "
            "(off: on PP-OCRv4 rec it lowered all-int8 SQNR 22.7 -> 20.5 dB)",
        )
        weight_storage: str = option(
            "int8",
            "how layers left float store their weights (int8: Cast->Mul that "
            "the runtime folds at load; smaller, same speed)",
            choices=STORAGE,
        )
        storage_block: int = option(
            32,
            "stored int8 weights get one scale per this many values of an output channel (0: one per channel)",
            low=0,
        )
        storage_sqnr: float = option(
            30.0,
            "SQNR (dB) against float that int8 weight storage alone must keep; "
            "the weights that cost most stay float until it is met",
        )
        smooth: str = option(
            "auto",
            "SmoothQuant-style smoothing of LayerNorm outputs read only by constant-weight MatMul/Attention "
            "(auto: each kept only where it raises the measured SQNR of its readers and of the model)",
            choices=("auto", "off"),
        )
        requantize: bool = option(
            False,
            "turn MatMulInteger layers of onnxruntime's dynamic quantization back "
            "into float MatMuls (weights dequantized) and quantize them with calibration",
        )

    options: Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options  # method and weight_storage were checked when the options were parsed
        data = ctx.require_calibration(self.name)
        model = to_proto(graph)
        notes: list[str] = []
        per_channel = opts.per_channel
        if per_channel and opset(model) < 13:
            model, note = _upgrade_opset(model)
            if note:
                notes.append(note)
                per_channel = False
        requantized: list[str] = []
        left: list[dict[str, str]] = []
        if opts.requantize:
            model, requantized, left = dequantize_dynamic_matmuls(model)
            if requantized:
                notes.append(f"requantize: {len(requantized)} MatMulInteger layers turned back into float MatMuls")
        model, smooth_notes, smoothed = smooth(model, data, opts, per_channel)
        notes.extend(smooth_notes)
        work = Work(model, data, opts, per_channel, notes, ctx.settings.get("executor"))
        final, details, stats, skipped = run_work(work)
        stats["smoothed_layernorms"] = len(smoothed)
        if smoothed:
            stats["smoothing"] = smoothed
        skipped = skipped + left
        stats["requantized"] = len(requantized)
        if final is work.model and not requantized:
            return PassResult(changed=False, stats=stats, skipped=skipped, details=details, reason=noop_reason(work))
        write_back(graph, final)
        return PassResult(changed=True, stats=stats, skipped=skipped, details=details)


def _upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Convert to opset 13 (per-channel DequantizeLinear); on failure keep the model and say why."""
    try:
        converted = onnx.version_converter.convert_version(model, 13)
        onnx.checker.check_model(structure_only(converted))
        return converted, None
    except _CONVERSION_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return model, f"opset {opset(model)} could not be upgraded to 13 ({reason}): per-tensor weights"
