"""How fast one layer shape runs as MatMulNBits against its float MatMul on onnxruntime's CPU EP:
single-layer models with random weights, timed interleaved (`onnxopt.runtime.timing`) and cached
on disk by shape, bits, block and accuracy level.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxopt.ir.ops import CONTRIB_DOMAIN
from onnxopt.kernels.blockquant import pack_matmul_nbits, quantize_rtn
from onnxopt.runtime.timing import TimingCache

#: The accuracy levels tried when choosing by speed: unset (the kernel's default), fp32 and int8
#: activations (fp16 and bf16 compute are not CPU-EP forms).
AUTO_LEVELS = (0, 1, 4)


def float_model(in_shape: tuple[int, ...], k: int, n: int) -> onnx.ModelProto:
    """y = x W with a random float32 W."""
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.05).astype(np.float32)
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], in_shape, [onnx.numpy_helper.from_array(w, "W")])


def nbits_model(in_shape: tuple[int, ...], k: int, n: int, bits: int, block: int, level: int) -> onnx.ModelProto:
    """The same layer as com.microsoft MatMulNBits (random weight, zero points, `level` accuracy)."""
    w = np.random.default_rng(0).standard_normal((k, n)) * 0.05
    B, S, Z = pack_matmul_nbits(quantize_rtn(w, bits, block))
    attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block}
    if level:
        attrs["accuracy_level"] = level
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain=CONTRIB_DOMAIN, **attrs)
    inits = [onnx.numpy_helper.from_array(a, nm) for a, nm in ((B, "B"), (S, "S"), (Z, "Z"))]
    return _model([node], in_shape, inits)


def _model(nodes: list[onnx.NodeProto], in_shape: tuple[int, ...], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB_DOMAIN, 1)]
    return helper.make_model(g, opset_imports=opsets)


def time_forms(
    in_shape: tuple[int, ...], k: int, n: int, block: int, levels: tuple[int, ...], cache: TimingCache
) -> dict[str, float]:
    """Median seconds of the layer shape as "float" and as "int{bits}@{level}" for bits 4 and 8 and
    each accuracy level of `levels`, all timed interleaved in one measurement (cached)."""
    names = ["float"] + [f"int{b}@{lv}" for b in (4, 8) for lv in levels]
    key = json.dumps(["nbits", list(in_shape), k, n, block, list(levels)])
    models = [float_model(in_shape, k, n)] + [
        nbits_model(in_shape, k, n, b, block, lv) for b in (4, 8) for lv in levels
    ]
    feeds = {"x": np.random.default_rng(1).standard_normal(in_shape).astype(np.float32)}
    return dict(zip(names, cache.measure(key, models, feeds, runs=20)))


def fastest(times: dict[str, float], bits: int) -> tuple[int, float]:
    """(accuracy level, seconds) of the fastest measured form of `bits`."""
    best = min((t, int(name.split("@")[1])) for name, t in times.items() if name.startswith(f"int{bits}@"))
    return best[1], best[0]
