"""How fast a layer shape runs dense and factorized on onnxruntime's CPU EP: single-layer models of
one shape (also used by bench/lowrank to re-check decisions), and their timings, cached on disk by shape.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.passes.lowrank.layers import Layer, has_bias
from onnxopt.runtime.decide import Comparison
from onnxopt.runtime.timing import TimingCache, comparison_of

_FLOAT32 = np.dtype(np.float32)


def layer_models(
    kind: str,
    in_shape: tuple[int, ...],
    m: int,
    n: int,
    rank: int,
    bias: bool = True,
    dtype: np.dtype = _FLOAT32,
    trans_a: int = 0,
    widths: list[int] | None = None,
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """Single-layer dense and factorized models of one layer shape (random weights) and a feed.

    ``widths`` splits n into layers sharing the first factor (dense: one product per layer).
    Used by the pass to decide, and by bench/lowrank to re-check the decision.
    """
    if widths and len(widths) > 1:
        return _group_models(kind, in_shape, m, rank, bias, np.dtype(dtype), widths)
    rng = np.random.default_rng(0)
    dtype = np.dtype(dtype)
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    make = onnx.helper.make_node

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(dtype), name)

    b = ["b"] if bias else []
    extra = [init("b", (n,))] if bias else []
    w_shapes: tuple[list[tuple[int, ...]], list[tuple[int, ...]]]
    if kind == "MatMul":
        tail = [make("Add", ["y0", "b"], ["y"])] if bias else [make("Identity", ["y0"], ["y"])]
        dense = [make("MatMul", ["x", "W"], ["y0"])] + tail
        fact = [make("MatMul", ["x", "A"], ["h"]), make("MatMul", ["h", "B"], ["y0"])] + tail
        w_shapes = [(m, n)], [(m, rank), (rank, n)]
    elif kind == "Gemm":
        dense = [make("Gemm", ["x", "W"] + b, ["y"], transA=trans_a)]
        fact = [make("Gemm", ["x", "A"], ["h"], transA=trans_a), make("Gemm", ["h", "B"] + b, ["y"])]
        w_shapes = [(m, n)], [(m, rank), (rank, n)]
    elif kind == "Conv":
        sp = (1,) * (len(in_shape) - 2)
        dense = [make("Conv", ["x", "W"] + b, ["y"])]
        fact = [make("Conv", ["x", "A"], ["h"]), make("Conv", ["h", "B"] + b, ["y"])]
        w_shapes = [(n, m) + sp], [(rank, m) + sp, (n, rank) + sp]
    else:
        raise ValueError(f"no layer model for op {kind}")

    def model(nodes: list[onnx.NodeProto], names: list[str], shapes: list[tuple[int, ...]]) -> onnx.ModelProto:
        inits = [init(nm, sh) for nm, sh in zip(names, shapes)] + extra
        g = onnx.helper.make_graph(
            nodes,
            "layer",
            [onnx.helper.make_tensor_value_info("x", elem, in_shape)],
            [onnx.helper.make_tensor_value_info("y", elem, None)],
            inits,
        )
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])

    feed = {"x": rng.standard_normal(in_shape).astype(dtype)}
    return model(dense, ["W"], w_shapes[0]), model(fact, ["A", "B"], w_shapes[1]), feed


def _group_models(
    kind: str, in_shape: tuple[int, ...], m: int, rank: int, bias: bool, dtype: np.dtype, widths: list[int]
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """Dense (one product per layer) and shared-factor models of a group of MatMul/Gemm layers."""
    rng = np.random.default_rng(0)
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    op = "Gemm" if kind == "Gemm" else "MatMul"

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(dtype), name)

    def model(first: list[onnx.NodeProto], src: str, weights: list[onnx.TensorProto]) -> onnx.ModelProto:
        nodes, inits, outs = list(first), list(weights), []
        for i, n in enumerate(widths):
            k = rank if src == "h" else m
            inits.append(init(f"W{i}", (k, n)))
            y = f"y{i}"
            if op == "Gemm":
                nodes.append(onnx.helper.make_node("Gemm", [src, f"W{i}"] + ([f"b{i}"] if bias else []), [y]))
            else:
                nodes.append(onnx.helper.make_node("MatMul", [src, f"W{i}"], [y + "m" if bias else y]))
                if bias:
                    nodes.append(onnx.helper.make_node("Add", [y + "m", f"b{i}"], [y]))
            if bias:
                inits.append(init(f"b{i}", (n,)))
            outs.append(onnx.helper.make_tensor_value_info(y, elem, None))
        g = onnx.helper.make_graph(
            nodes, "group", [onnx.helper.make_tensor_value_info("x", elem, in_shape)], outs, inits
        )
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])

    dense = model([], "x", [])
    fact = model([onnx.helper.make_node(op, ["x", "A"], ["h"])], "h", [init("A", (m, rank))])
    return dense, fact, {"x": rng.standard_normal(in_shape).astype(dtype)}


def timing_key(L: Layer, rank: int) -> str:
    """Cache key of one dense-vs-factorized timing: op, input shape, weight shape, rank, bias, dtype."""
    return (
        f"{L.kind}|x={'x'.join(map(str, L.in_shape))}|w={L.m}x{L.n}|r={rank}|bias={int(has_bias(L))}|"
        f"tA={int(L.node.attrs.get('transA', 0))}|{np.dtype(L.dtype).name}"
        + (f"|split={'+'.join(str(M.n) for M in L.members)}" if L.members else "")
    )


def time_layer(L: Layer, rank: int) -> tuple[float, float, Comparison]:
    """(dense seconds, factorized seconds, factorized/dense `Comparison`) for L's shape at `rank`,
    from the timing cache or measured (repeated, with the ratio's confidence interval)."""
    cache = TimingCache("lowrank")
    key = timing_key(L, rank)
    hit = cache.get(key)
    if hit is not None and len(hit) in (2, 5):
        return hit[0], hit[1], comparison_of(hit)
    dense, fact, feed = layer_models(
        L.kind,
        L.in_shape,
        L.m,
        L.n,
        rank,
        has_bias(L),
        L.dtype,
        int(L.node.attrs.get("transA", 0)),
        [M.n for M in L.members],
    )
    cmp = cache.compare(key, [dense, fact], feed, runs=30)
    t = cache.get(key) or [1.0, cmp.ratio]
    return t[0], t[1], cmp
