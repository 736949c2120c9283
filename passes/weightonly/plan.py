"""Per-layer choice of int4 / int8 / float: quantize each layer both ways with the chosen rounding,
measure the output error under its input second moment, drop the forms slower than float on the
CPU EP, and spend the size budget on int8 where it removes the most error per byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxopt.data.moments import RowMoments
from onnxopt.kernels.blockquant import BlockQuant, awq_search, dequantize, output_error, quantize_rtn
from onnxopt.kernels.gptq import gptq_quantize
from onnxopt.passes.weightonly.layers import Layer
from onnxopt.passes.weightonly.options import WeightOnlyOptions
from onnxopt.passes.weightonly.timing import AUTO_LEVELS, fastest, time_forms
from onnxopt.runtime.timing import TimingCache


def nbits_bytes(k: int, n: int, bits: int, block: int, contrib: bool) -> int:
    """Stored bytes of a K x N weight at `bits`: codes (K padded to whole blocks in MatMulNBits),
    float32 scales and packed zero points."""
    kb = -(-k // block)
    if contrib:
        return n * kb * block * bits // 8 + n * kb * 4 + n * (-(-kb * bits // 8))
    return -(-k * n * bits // 8) + kb * n * 4 + -(-kb * n * bits // 8)


def quantize_layer(L: Layer, bits: int, o: WeightOnlyOptions, H: np.ndarray | None) -> tuple[BlockQuant, float]:
    """L's weight at `bits` with the chosen rounding (RTN without data), and its relative output error."""
    if H is not None and o.rounding == "awq":
        s, bq, err = awq_search(L.W, H, bits, o.block)
        L.awq_scale[f"int{bits}"] = s
        return bq, err
    if H is not None and o.rounding == "gptq":
        bq = gptq_quantize(L.W, H, bits, o.block, damp=o.damp)
    else:
        bq = quantize_rtn(L.W, bits, o.block, clip_search=True)
    return bq, output_error(L.W, dequantize(bq), H)


def quantize_all(layers: list[Layer], o: WeightOnlyOptions, moments: dict[str, RowMoments]) -> None:
    """Both forms (int4 at `bits`=4, and int8) of every layer with their errors, into the layer."""
    for L in layers:
        st = moments.get(L.x.name)
        H = st.second_moment() if st is not None and st.finite() else None
        for bits in (4, 8) if o.bits == 4 else (8,):
            bq, err = quantize_layer(L, bits, o, H)
            L.quants[f"int{bits}"], L.errors[f"int{bits}"] = bq, err
            L.row[f"error_int{bits}"] = round(err, 5)
        L.row["rounding"] = o.rounding if H is not None else "rtn (no input statistics)"


def allowed_forms(L: Layer, o: WeightOnlyOptions, target: str, cache: TimingCache) -> list[str]:
    """The quantized forms of L that are not slower than float (CPU target, timed per shape), with
    their accuracy levels into `L.accuracy`; every form on other targets (not timed here)."""
    forms: list[str] = [f for f in ("int4", "int8") if f in L.quants]
    level = None if o.accuracy_level == "auto" else int(o.accuracy_level)
    for f in forms:
        L.accuracy[f] = level if level is not None else 0
    if target != "cpu" or not o.timing:
        L.row["timing"] = f"not timed (target {target})" if target != "cpu" else "not timed (timing=False)"
        return forms
    shape = L.in_shape or (1, L.k)
    times = time_forms(shape, L.k, L.n, o.block, AUTO_LEVELS if level is None else (level,), cache)
    kept: list[str] = []
    for f in forms:
        lv, t = fastest(times, int(f[3:]))
        L.accuracy[f] = lv
        ratio = t / times["float"] if times["float"] > 0 else 1.0
        L.row[f"{f}_latency_ratio"] = round(ratio, 3)
        L.row[f"{f}_accuracy_level"] = lv
        if ratio <= 1.0:
            kept.append(f)
    L.row["timed_shape"] = "x".join(map(str, shape))
    return kept


def choose(layers: list[Layer], allowed: dict[str, list[str]], o: WeightOnlyOptions, contrib: bool) -> dict:
    """Set each layer's form: the smallest allowed one, then (with `size`) int4 layers move to int8,
    most error removed per extra byte first, while the quantized bytes stay within the budget."""
    size = {L.node.name: {"float": L.k * L.n * 4} for L in layers}
    for L in layers:
        for f in allowed[L.node.name]:
            size[L.node.name][f] = nbits_bytes(L.k, L.n, int(f[3:]), o.block, contrib)
        forms = allowed[L.node.name]
        L.form = forms[0] if forms else "float"
        if not forms:
            L.row["why"] = "MatMulNBits slower than float at every bits and accuracy level (per-layer timing)"
        elif L.form != f"int{o.bits}":
            L.row["why"] = f"int{o.bits} slower than float (per-layer timing)"
    total_float = sum(s["float"] for s in size.values())
    used = sum(size[L.node.name][L.form] for L in layers)
    stats: dict[str, Any] = {"bytes_float": total_float, "bytes_quantized": used}
    if o.size is None or not total_float:
        return stats
    budget = o.size * total_float
    ups = [L for L in layers if L.form == "int4" and "int8" in allowed[L.node.name]]
    gain = {
        L.node.name: (L.errors["int4"] ** 2 - L.errors["int8"] ** 2)
        / max(size[L.node.name]["int8"] - size[L.node.name]["int4"], 1)
        for L in ups
    }
    for L in sorted(ups, key=lambda L: -gain[L.node.name]):
        extra = size[L.node.name]["int8"] - size[L.node.name]["int4"]
        if used + extra <= budget:
            L.form, used = "int8", used + extra
            L.row["why"] = f"int8 within the size budget ({o.size}) removes the most error"
    stats.update(bytes_quantized=used, size_budget=o.size, size_met=used <= budget)
    return stats
