"""Activation ranges from calibration: the scale and zero point of every quantized tensor, and the
per-channel input means that bias correction needs."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.data.calibration import activation_histograms, channel_means
from onnxopt.ir.ops import node_attrs, ops_where, out_channel_axis
from onnxopt.kernels.observers import HistogramObserver
from onnxopt.kernels.quant import scale_zero_point
from onnxopt.kernels.ranges import range_entropy, range_minmax, range_mse, range_percentile
from onnxopt.passes.quantize.qdq import ActParams
from onnxopt.passes.quantize.state import Work


def act_params(work: Work, layers: list[onnx.NodeProto]) -> dict[str, ActParams]:
    """Scale/zero point of every layer input and output from calibration (pass-through inputs reuse
    the scale of the quantized tensor they come from, so onnxruntime can drop their Q/DQ). Records
    each range in `work.ranges` and the observed shapes in `work.shapes`."""
    source = {n.input[0]: _quantized_source(work, n.input[0]) for n in layers}
    tensors = sorted({n.output[0] for n in layers} | set(source.values()) | set(source))
    hists = activation_histograms(
        work.model,
        work.data,
        tensors,
        cache=work.opts.cache,
        desc="quantize: calibrating",
        shapes=work.shapes,
        executor=work.executor,
    )
    overrides = {}
    for text in work.opts.ranges:
        name, _, rng = text.partition("=")
        lo, _, hi = rng.partition(":")
        overrides[name] = (float(lo), float(hi))
    params = {}
    for t in tensors:
        lo, hi = overrides.get(t) or _range(work, hists[t])
        params[t] = ActParams(*scale_zero_point(lo, hi, work.act_type, symmetric=work.act_type == "int8"))
        work.ranges[t] = (lo, hi)
    for t, src in source.items():
        params[t] = params[src]
    return params


def _quantized_source(work: Work, t: str) -> str:
    """The tensor whose scale `t` reuses: walking up through pass-through ops read by one node only."""
    pass_through = ops_where("pass_through")
    while t in work.producer and work.producer[t].op_type in pass_through and len(work.consumers.get(t, [])) == 1:
        t = work.producer[t].input[0]
    return t


def _range(work: Work, hist: HistogramObserver) -> tuple[float, float]:
    """The (min, max) that the option `method` chooses from a tensor's histogram."""
    m, sym = work.opts.method, work.act_type == "int8"
    if m == "minmax":
        return range_minmax(hist)
    if m == "percentile":
        return range_percentile(hist, work.opts.percentile, symmetric=sym)
    if m == "entropy":
        return range_entropy(hist, symmetric=sym)
    return range_mse(hist, symmetric=sym)


def input_means(work: Work, layers: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Per-channel means of each layer's input (channel axis 1 for Conv, last for Gemm/MatMul), by node."""
    axes = {n.input[0]: 1 if n.op_type == "Conv" else -1 for n in layers if n.op_type in ("Conv", "Gemm", "MatMul")}
    obs = channel_means(work.model, work.data, axes, cache=work.opts.cache, desc="quantize: input means")
    found = {}
    for n in layers:
        o = obs.get(n.input[0])
        m = None if o is None else o.mean
        if m is not None and m.shape == (_input_channels(work, n),):
            found[n.name] = m
    return found


def _input_channels(work: Work, n: onnx.NodeProto) -> int:
    """How many input channels layer `n` reads: what its input mean must hold."""
    w = work.consts[n.input[1]]
    if n.op_type == "Conv":
        return w.shape[1] * int(node_attrs(n).get("group", 1))
    if n.op_type == "Gemm" and out_channel_axis(n) == 0:
        return w.shape[1]
    return w.shape[0]
