"""Helpers of the executor tests: module-level tasks (pickled by reference into worker processes), a tiny model,
and the quantize pass's sensitivity analysis run on a given executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx


def square(x: int) -> int:
    """A trivial task."""
    return x * x


def fail_on_three(x: int) -> int:
    """A task that raises for one item (exceptions are errors, not worker deaths: never retried)."""
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def die_once(item: tuple[str, int]) -> int:
    """Kill the worker process on this item's first attempt (a marker file remembers it), then succeed."""
    marker_dir, x = item
    if x == 2:
        marker = Path(marker_dir) / f"died-{x}"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(17)
    return x * 10


def shared_sum(item: tuple) -> float:
    """Read a shared array inside a task."""
    handle, i = item
    return float(handle.get()[i].sum())


TINY = """
<ir_version: 8, opset_import: ["" : 13]>
tiny (float[1, 3, 16, 16] x) => (float[1, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1]> (r1, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, w3, b3)
}
"""


def tiny_model() -> onnx.ModelProto:
    """A small Conv-Conv-Gemm net with seeded weights and named nodes."""
    m = onnx.parser.parse_model(TINY)
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (16, 8, 3, 3), "b2": (16,), "w3": (10, 16), "b3": (10,)}
    for name, shape in shapes.items():
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    for i, n in enumerate(m.graph.node):
        n.name = f"{n.op_type}_{i}"
    return m


def tiny_samples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded inputs of the tiny model with varied scales."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32) * (1 + i % 3)} for i in range(n)]


def quantize_sensitivity(
    model: onnx.ModelProto, samples: list, executor: Any, target_sqnr: float
) -> tuple[dict[str, float], list[tuple], bytes]:
    """The quantize pass (no timing, no statistics cache) with `executor` in its settings: the per-layer SQNRs
    exactly as its sensitivity trials returned them, its layer decisions (node, int8, why) and the model's bytes."""
    import onnxopt
    from onnxopt.passes.quantize import search as quantize

    real, seen = quantize.sensitivity, []

    def spy(*args: Any, **kwargs: Any) -> dict[str, float]:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    quantize.sensitivity = spy
    try:
        res = onnxopt.optimize(
            model,
            pipeline=f"quantize{{latency_aware=false,check_latency=false,cache=false,"
            f"sensitivity_samples=4,target_sqnr={target_sqnr}}}",
            calibration=samples,
            settings={"executor": executor},
        )
    finally:
        quantize.sensitivity = real
    rows = next(p for p in res.report["passes"] if p.get("name", p.get("pass")) == "quantize")["details"]
    seen = [s for s in seen if s]  # phases with nothing to try return no trial
    assert len(seen) >= 2  # at least storage trials (w2 has >= 1024 weights) and int8 compute trials
    sens = {f"{k} (trial set {i})": v for i, s in enumerate(seen) for k, v in s.items()}
    return sens, [(r["node"], r["int8"], r["why"]) for r in rows], res.model.SerializeToString()
