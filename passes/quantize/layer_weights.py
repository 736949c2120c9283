"""Int8 weights of one layer: for int8 compute (per-channel int8 weight, int32 bias) and for int8
storage of a layer that computes in float (blocks of values per output channel)."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.ir import weights
from onnxopt.ir.ops import node_attrs, out_channel_axis, reduced_axes
from onnxopt.kernels.bias_correction import mean_output_shift
from onnxopt.kernels.bias_guard import bias_safe_weight_scales
from onnxopt.kernels.quant import (
    BIAS_MIN_SCALE,
    BiasQuantizationError,
    dequantize,
    quantize,
    quantize_bias,
    quantize_weight_blocks,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
    u8s8_saturates,
)
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant, WeightStore
from onnxopt.passes.quantize.state import Work


def int8_weight(work: Work, n: onnx.NodeProto, u8_inputs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Symmetric int8 weight of `n` (per output channel, or per tensor), its scales, zero points and
    notes: 7-bit where a uint8 input (`u8_inputs`) would saturate u8s8 pair sums on a non-VNNI CPU."""
    w = work.consts[n.input[1]]
    axis = out_channel_axis(n) if work.per_channel else None
    notes = []
    q, s, z = _int8_weights(w, axis, False)
    if not work.vnni and u8_inputs and u8s8_saturates(q, reduced_axes(n, w.ndim)):
        q, s, z = _int8_weights(w, axis, True)
        notes.append("7-bit weights (u8s8 saturation without VNNI)")
    return q, s, z, notes


def quantize_layer(work: Work, n: onnx.NodeProto, x: ActParams) -> LayerQuant | str:
    """Int8 weight (7-bit where u8s8 would saturate on a non-VNNI CPU) and int32 bias, or why not."""
    axis = out_channel_axis(n) if work.per_channel else None
    q, s, z, notes = int8_weight(work, n, work.act_type == "uint8")
    bq = bs = None
    has_bias = len(n.input) > 2 and bool(n.input[2])
    mean = work.means.get(n.name)
    if has_bias or (mean is not None and n.op_type in ("Conv", "Gemm")):
        bias = _int32_bias(work, n, x, mean, (q, s), notes)
        if isinstance(bias, str):
            return bias
        q, s, bq, bs = bias
        if axis is None:
            bs = np.asarray(bs).reshape(())
    return held(work, LayerQuant(n.name, q, np.asarray(s, np.float32), np.asarray(z, np.int8), axis, bq, bs, notes))


def _int8_weights(w: np.ndarray, axis: int | None, reduce: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 weight, scales and zero points: per channel on `axis`, per tensor when None;
    `reduce`: 7-bit values."""
    if axis is None:
        q, s, z = quantize_weight_per_tensor(w, reduce_range=reduce)
        return q, np.asarray(s), np.asarray(z)
    return quantize_weight_per_channel(w, axis, reduce_range=reduce)


def _corrected_bias(work: Work, n: onnx.NodeProto, mean: np.ndarray | None, q: np.ndarray, s) -> np.ndarray:
    """The float bias (zeros where `n` has none) minus the mean output shift of the rounded weights
    (bias correction, when `mean` holds the layer's input means)."""
    w = work.consts[n.input[1]]
    has_bias = len(n.input) > 2 and bool(n.input[2])
    bias = work.consts[n.input[2]] if has_bias else np.zeros(w.shape[out_channel_axis(n)], np.float32)
    if mean is None:
        return bias
    kind = "conv" if n.op_type == "Conv" else "gemm_t" if out_channel_axis(n) == 0 else "matmul"
    w_dq = dequantize(q, s, 0, axis=out_channel_axis(n) if work.per_channel else None)
    shift = mean_output_shift(w, w_dq, mean, kind, int(node_attrs(n).get("group", 1)))
    return (bias - shift).astype(np.float32)


def _int32_bias(
    work: Work, n: onnx.NodeProto, x: ActParams, mean: np.ndarray | None, qs: tuple, notes: list[str]
) -> tuple | str:
    """(weight, weight scales, int32 bias, bias scales): where the bias does not fit int32 at the
    weight scales, those scales are widened on the channels that need it first (noted); or why not."""
    q, s = qs
    bias = _corrected_bias(work, n, mean, q, s)
    try:
        bq, bs = quantize_bias(bias, x.scale, s)
        return q, s, bq, bs
    except BiasQuantizationError as exc:
        w = work.consts[n.input[1]]
        axis = out_channel_axis(n) if work.per_channel else None
        s = bias_safe_weight_scales(s, bias, float(x.scale), BIAS_MIN_SCALE)
        qmax = 63 if notes else 127  # notes holds the 7-bit choice made above
        q = np.clip(quantize(w, s, np.zeros(np.shape(s), np.int8), np.int8, axis=axis), -qmax, qmax).astype(np.int8)
        notes.append(f"weight scales widened on {len(exc.channels)} channel(s) for an int32 bias")
    bias = _corrected_bias(work, n, mean, q, s)
    try:
        bq, bs = quantize_bias(bias, x.scale, s)
    except BiasQuantizationError as exc2:
        return f"bias not representable in int32 ({exc2})"
    return q, s, bq, bs


def stored_layer(work: Work, n: onnx.NodeProto) -> LayerQuant:
    """Int8 storage for a layer kept float (float bias, float compute): blocks of
    `storage_block` values per output channel where the layout allows, else per channel
    (or per tensor)."""
    w = work.consts[n.input[1]]
    axis = out_channel_axis(n)
    blocks = quantize_weight_blocks(w, axis, work.opts.storage_block) if work.opts.storage_block > 1 else None
    if blocks is not None:
        q, s = blocks
        return held(work, LayerQuant(n.name, q, s, np.zeros((), np.int8), axis, shape=tuple(w.shape)))
    if not work.per_channel:
        qt, st, zt = quantize_weight_per_tensor(w)
        return held(work, LayerQuant(n.name, qt, np.asarray(st, np.float32), np.asarray(zt, np.int8), None))
    q, s, z = quantize_weight_per_channel(w, axis)
    return held(work, LayerQuant(n.name, q, np.asarray(s, np.float32), np.asarray(z, np.int8), axis))


def held(work: Work, lq: LayerQuant) -> LayerQuant:
    """`lq` as kept for the rest of the run: a big model's large int8 weight is parked on disk
    (`weights.park`), so the int8 weights of every layer, kept for the trial models, are not
    resident all at once beside the float weights onnxruntime maps."""
    if work.big and lq.weight_q.nbytes >= weights.SPILL_BYTES:
        lq.weight_q = weights.park(lq.weight_q)
    return lq


def weight_store(work: Work, tensor: str, axis: int) -> WeightStore:
    """Int8 storage of a weight: blocks of `storage_block` values of each output channel where the
    layout allows (a recurrent [directions, gates*hidden, inputs] weight as a matrix of its rows),
    else one scale per output channel."""
    w = work.weight_array(tensor)
    flat, faxis = (w.reshape(-1, w.shape[-1]), 0) if w.ndim == 3 and axis == 1 else (w, axis)
    blocks = quantize_weight_blocks(flat, faxis, work.opts.storage_block) if work.opts.storage_block > 1 else None
    if blocks is not None:
        return WeightStore(tensor, blocks[0], blocks[1], tuple(w.shape))
    q, s, _ = quantize_weight_per_channel(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return WeightStore(tensor, q, np.asarray(s, np.float32).reshape(shape))
