"""The `lowrank` pass: factorize constant Gemm/MatMul/1x1-Conv weights W (m x n) into A (m x r) @ B (r x n).

A layer y = x W + b becomes y = (x A) B + b' only where it pays twice: the
rank saves parameters and MACs (r < m n / (m + n)) and the factorized form of
that layer shape is faster than the dense one on onnxruntime's CPU EP (both
timed, cached on disk by shape). Ranks come from a per-layer energy threshold
or a global parameter / error budget. With calibration data the factors are
whitened by the layer's input covariance (SVD-LLM / ASVD), so the discarded
singular values are the real output error, and the bias absorbs the mean of
that error; without data it is a plain truncated SVD of W.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.calibration import observe
from onnxopt.graph import constant_value, export_model, unique_name
from onnxopt.errors import UserError
from onnxopt.kernels.lowrank import (CovarianceAccumulator, energy_rank, max_useful_rank, round_rank, truncated_svd,
                                     whitened_svd)
from onnxopt.kernels.lowrank_budget import (LayerCurve, allocate_ranks, allowed_ranks, corrected_bias,
                                            factor_params, output_energy, plain_error_curve,
                                            relative_output_error, whitened_error_curve)
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.registry import register_pass
from onnxopt.shapes import concrete_input_shapes, infer_tensor_info
from onnxopt.timing import TimingCache

_FLOATS = (np.float16, np.float32, np.float64)


@dataclass
class _Layer:
    """One factorizable layer: y = x W (+ bias), W the effective m x n matrix (alpha and transB applied)."""

    node: gs.Node
    kind: str                      # "MatMul" | "Gemm" | "Conv"
    x: gs.Tensor
    W: np.ndarray                  # float64, m x n
    dtype: np.dtype
    layout: str                    # how rows of x are read: "last" | "channel" | "transposed"
    bias: np.ndarray | None = None  # effective bias of length n, when it can be rewritten
    bias_add: gs.Node | None = None  # the Add holding a MatMul's bias
    can_add_bias: bool = False     # a (corrected) bias can be written even if there is none
    out: gs.Tensor | None = None   # the layer's output (after the bias Add)
    in_shape: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()  # a 1x1 Conv's kernel shape (all ones)
    curve: np.ndarray | None = None
    rank: int = 0
    cap: int = 0
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.W.shape[0]

    @property
    def n(self) -> int:
        return self.W.shape[1]


class _InputStats:
    """Streamed covariance of one tensor read as rows of every layout its layers need; keeps the largest shape."""

    def __init__(self, dims: dict[str, int]):
        self.accs = {layout: CovarianceAccumulator(d) for layout, d in dims.items()}
        self.shape: tuple[int, ...] = ()

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size > int(np.prod(self.shape or (0,))):
            self.shape = tuple(x.shape)
        for layout, acc in self.accs.items():
            acc.update(_rows(x, layout))


def _rows(x: np.ndarray, layout: str) -> np.ndarray:
    """The input as rows [-1, m] of the matrix product the layer computes."""
    if layout == "channel":
        return np.moveaxis(x, 1, -1)
    if layout == "transposed":
        return x.T
    return x


@register_pass("lowrank")
class LowRank(Pass):
    """Factorize Gemm/MatMul/1x1-Conv weights into two thinner products where fewer parameters and faster."""

    tolerance = "approximate"

    @dataclass
    class Options:
        energy: float = option(0.98, "per-layer share of singular-value energy to keep (when no budget is given)")
        params: float | None = option(None, "global budget: fraction of the factorizable layers' parameters to "
                                            "remove (e.g. 0.3)")
        error: float | None = option(None, "global budget: root-sum-square of the layers' relative output "
                                           "errors on the calibration data")
        multiple: int = option(8, "round ranks to a multiple of this (hardware-friendly widths)")
        method: str = option("auto", "auto (whiten with calibration data, else svd) | whiten | svd")
        timing: bool = option(True, "time dense vs factorized on onnxruntime CPU and keep the faster")
        min_speedup: float = option(1.05, "factorize only where dense/factorized time >= this")
        rounds: int = option(4, "budget re-allocations after layers lose to their dense form in timing")
        measure: int = option(4, "calibration samples for the measured (in-model) error; 0 = skip")
        ops: list[str] = option(["Gemm", "MatMul", "Conv"], "layer types to factorize (Conv: 1x1 only)")
        min_params: int = option(1024, "leave layers with fewer weight parameters alone")
        eps: float = option(1e-6, "damping of the covariance, relative to its mean diagonal")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.method not in ("auto", "whiten", "svd"):
            raise UserError(f"pass 'lowrank': method must be auto, whiten or svd, got '{o.method}'")
        whiten = o.method == "whiten" or (o.method == "auto" and ctx.calibration is not None)
        if whiten:
            ctx.require_calibration(self.name)
        skipped: list[dict[str, str]] = []
        layers = self._collect(graph, skipped)
        stats: dict[str, Any] = {"candidates": len(layers), "method": "whiten" if whiten else "svd"}
        if not layers or (o.params is not None and o.params <= 0) or (o.error is not None and o.error <= 0):
            return PassResult(False, {**stats, "factorized": 0}, skipped)
        model = export_model(graph)
        moments = self._observe(model, layers, ctx, whiten) if ctx.calibration is not None else {}
        self._shapes(model, layers, moments, ctx)
        for L in layers:
            L.curve = self._curve(L, moments, whiten)
        self._choose(layers, skipped)
        done = [L for L in layers if L.rank > 0]
        for L in done:
            self._rewrite(graph, L, moments, whiten)
        total = sum(L.m * L.n for L in layers)
        removed = sum(L.m * L.n - factor_params(L.m, L.n, L.rank) for L in done)
        stats.update(factorized=len(done), params_candidates=total, params_removed=removed,
                     fraction_removed=round(removed / total, 4) if total else 0.0,
                     macs_removed=sum(L.row.get("macs_saved", 0) for L in done))
        if done and o.measure and ctx.calibration is not None:
            self._measure(model, graph, done, ctx)
        return PassResult(bool(done), stats, skipped, [L.row for L in layers if L.row])

    # ---------------------------------------------------------------- finding layers
    def _collect(self, graph: gs.Graph, skipped: list[dict[str, str]]) -> list[_Layer]:
        layers = []
        outputs = {id(t) for t in graph.outputs}
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm", "Conv") or node.op not in self.options.ops:
                continue
            why, layer = self._layer(node, outputs)
            if layer is None:
                if why:
                    skipped.append({"node": node.name, "op": node.op, "reason": why})
                continue
            if layer.m * layer.n < self.options.min_params:
                skipped.append({"node": node.name, "op": node.op, "reason": f"weight {layer.m}x{layer.n} "
                                f"below min_params={self.options.min_params}"})
                continue
            if max_useful_rank(layer.m, layer.n) < 1:
                skipped.append({"node": node.name, "op": node.op, "reason": "no rank saves parameters"})
                continue
            layers.append(layer)
        return layers

    def _layer(self, node: gs.Node, graph_outputs: set[int]) -> tuple[str, _Layer | None]:
        """(reason, None) when the node is not a factorizable layer, else ("", layer)."""
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            return "unexpected arity", None
        w = constant_value(node.inputs[1])
        if w is None:
            return "weight is not a constant", None
        w = np.asarray(w)
        if w.dtype.type not in _FLOATS:
            return f"weight dtype {w.dtype} is not float", None
        x = node.inputs[0]
        if node.op == "MatMul":
            if w.ndim != 2:
                return f"weight is {w.ndim}-D, not 2-D", None
            L = _Layer(node, "MatMul", x, w.astype(np.float64), w.dtype, "last", out=node.outputs[0])
            self._matmul_bias(L, graph_outputs)
            return "", L
        if node.op == "Gemm":
            if w.ndim != 2:
                return "Gemm weight is not 2-D", None
            a = node.attrs
            W = (w.T if a.get("transB", 0) else w).astype(np.float64) * float(a.get("alpha", 1.0))
            L = _Layer(node, "Gemm", x, W, w.dtype, "transposed" if a.get("transA", 0) else "last",
                       out=node.outputs[0])
            if len(node.inputs) < 3 or not node.inputs[2].name:
                L.can_add_bias = True
            else:
                c = constant_value(node.inputs[2])
                c = None if c is None else np.asarray(c, np.float64)
                # A per-column bias ([n], [1, n] or a scalar) can take the correction; a per-row C cannot.
                if c is not None and c.size in (1, L.n) and (c.ndim < 2 or c.shape[0] == 1):
                    L.bias = np.broadcast_to(c.reshape(-1), (L.n,)) * float(a.get("beta", 1.0))
                    L.can_add_bias = True
            return "", L
        # Conv: only 1x1, group 1, stride 1, no padding is a matrix product over channels.
        if w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
            return "", None
        a = node.attrs
        if a.get("group", 1) != 1:
            return "grouped 1x1 conv", None
        if any(s != 1 for s in a.get("strides", [1])) or any(p != 0 for p in a.get("pads", [0])):
            return "1x1 conv with stride or padding", None
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            return "unknown auto_pad", None
        W = w.reshape(w.shape[0], w.shape[1]).T.astype(np.float64)
        L = _Layer(node, "Conv", x, W, w.dtype, "channel", out=node.outputs[0], can_add_bias=True,
                   spatial=tuple(w.shape[2:]))
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = constant_value(node.inputs[2])
            if b is None:
                return "conv bias is not a constant", None
            L.bias = np.asarray(b, np.float64).reshape(-1)
        return "", L

    @staticmethod
    def _matmul_bias(L: _Layer, graph_outputs: set[int]) -> None:
        """Adopt the constant bias of an Add that is the MatMul output's only consumer."""
        y = L.node.outputs[0]
        if id(y) in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "Add":
            return
        add = y.outputs[0]
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        b = constant_value(other)
        if b is None or add.inputs[0] is add.inputs[1]:
            return
        b = np.asarray(b)
        if b.size != L.n or b.shape[-1] != L.n or b.ndim > max(len(L.x.shape or ()), 1):
            return
        L.bias, L.bias_add, L.out, L.can_add_bias = b.astype(np.float64).reshape(-1), add, add.outputs[0], True

    # ---------------------------------------------------------------- data
    def _observe(self, model: onnx.ModelProto, layers: list[_Layer], ctx: PassContext,
                 covariance: bool) -> dict[str, _InputStats]:
        """Stream the calibration data: input covariances (when whitening) and the largest input shapes."""
        dims: dict[str, dict[str, int]] = {}
        for L in layers:
            dims.setdefault(L.x.name, {})
            if covariance:
                dims[L.x.name][L.layout] = L.m
        calib = ctx.calibration
        return observe(model, calib, list(dims), lambda name: _InputStats(dims[name]),
                       desc="lowrank: layer inputs", total=len(calib))

    def _shapes(self, model: onnx.ModelProto, layers: list[_Layer], moments: dict[str, _InputStats],
                ctx: PassContext) -> None:
        """Input shape of each layer for timing: the largest calibration shape, else inferred (dynamic -> 1)."""
        info = None
        for L in layers:
            st = moments.get(L.x.name)
            if st is not None and st.shape:
                L.in_shape = st.shape
                continue
            if info is None:
                pinned = ctx.settings.get("input_shapes")
                if not pinned and ctx.calibration is not None:
                    pinned = {k: tuple(v.shape) for k, v in next(iter(ctx.calibration)).items()}
                shapes = concrete_input_shapes(model, pinned)
                info = infer_tensor_info(model, shapes)
            ti = info.get(L.x.name)
            dims = tuple(ti.shape) if ti is not None and ti.shape is not None else (1, L.m)
            L.in_shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)

    def _curve(self, L: _Layer, moments: dict[str, _InputStats], whiten: bool) -> np.ndarray:
        if not whiten:
            return plain_error_curve(L.W)
        acc = moments[L.x.name].accs[L.layout]
        energy = output_energy(L.W, acc.second_moment(), acc.mean(), L.bias)
        return whitened_error_curve(L.W, self._whitening_matrix(L, acc), energy, self.options.eps)

    @staticmethod
    def _whitening_matrix(L: _Layer, acc: CovarianceAccumulator) -> np.ndarray:
        """Centered covariance where the bias can absorb the mean error, else the second moment."""
        return acc.covariance() if L.can_add_bias else acc.second_moment()

    # ---------------------------------------------------------------- ranks
    def _choose(self, layers: list[_Layer], skipped: list[dict[str, str]]) -> None:
        """Pick ranks, time each chosen layer, and re-allocate around the layers that lost to dense."""
        o = self.options
        budget = o.params is not None or o.error is not None
        total = sum(L.m * L.n for L in layers)
        for L in layers:
            L.cap = max_useful_rank(L.m, L.n)
        for _ in range(max(o.rounds, 0) + 1):
            live = [L for L in layers if L.cap > 0]
            for L in layers:
                L.rank = 0
            if budget:
                share = None if o.params is None else o.params * total / max(sum(L.m * L.n for L in live), 1)
                ranks = allocate_ranks([LayerCurve(L.m, L.n, L.curve, L.cap) for L in live], o.multiple,
                                       params=share, error=o.error if o.params is None else None)
                for L, r in zip(live, ranks):
                    L.rank = r
            else:
                for L in live:
                    L.rank = self._energy_rank(L)
            lost = [L for L in layers if L.rank > 0 and not self._faster(L)]
            if not lost:
                break
            for L in lost:
                t_d, t_f = L.row["dense_us"], L.row["factorized_us"]
                # Factorized time grows about linearly with the rank: guess the rank that would win.
                guess = int(L.rank * t_d / (t_f * o.min_speedup)) if budget and t_f > 0 else 0
                fits = allowed_ranks(L.m, L.n, o.multiple, min(guess, L.rank - 1)) if guess > 0 else []
                L.cap = fits[0] if fits else 0
                L.rank = 0
        for L in layers:
            if L.rank > 0:
                L.row.pop("why", None)
                L.row["decision"] = "factorized"
                continue
            reason = L.row.pop("why", None) or "dense kept: no rank within the budget"
            L.row.update(self._row(L, 0), decision=reason)
            skipped.append({"node": L.node.name, "op": L.kind, "reason": reason})

    def _energy_rank(self, L: _Layer) -> int:
        """Smallest rank keeping `energy` of the (whitened) spectrum, rounded; 0 if it saves nothing."""
        s2 = np.maximum(-np.diff(L.curve), 0.0)  # squared singular values, normalized
        if s2.sum() <= 0:
            return 0
        r = round_rank(energy_rank(np.sqrt(s2), self.options.energy), self.options.multiple,
                       limit=min(L.m, L.n))
        if r > L.cap:
            L.row.update(self._row(L, r))
            L.row["why"] = (f"rank {r} for energy {self.options.energy} saves nothing or lost in timing "
                            f"(parameters drop below rank {L.m * L.n / (L.m + L.n):.1f})")
            return 0
        return r

    def _faster(self, L: _Layer) -> bool:
        """Time dense vs factorized at L.rank (cached) and record it; True when factorized wins."""
        L.row.update(self._row(L, L.rank))
        if not self.options.timing:
            L.row.update(dense_us=None, factorized_us=None)
            return True
        t_d, t_f = _time_layer(L, L.rank)
        L.row.update(dense_us=round(t_d * 1e6, 2), factorized_us=round(t_f * 1e6, 2))
        ok = t_d >= t_f * self.options.min_speedup
        if not ok:
            L.row["why"] = (f"factorized at rank {L.rank} not faster: {t_f * 1e6:.1f} us vs dense "
                            f"{t_d * 1e6:.1f} us")
        return ok

    def _row(self, L: _Layer, r: int) -> dict[str, Any]:
        rows = int(np.prod(L.in_shape)) // L.m if L.in_shape else 1
        err2 = float(L.curve[min(r, len(L.curve) - 1)]) if r > 0 else 0.0
        return {"node": L.node.name or L.node.outputs[0].name, "op": L.kind, "m": L.m, "n": L.n, "rows": rows, "rank": r,
                "max_useful_rank": max_useful_rank(L.m, L.n),
                "energy_kept": round(1.0 - err2, 6),
                "predicted_error": round(float(np.sqrt(err2)), 6),
                "params_saved": L.m * L.n - factor_params(L.m, L.n, r),
                "macs_saved": rows * (L.m * L.n - factor_params(L.m, L.n, r))}

    # ---------------------------------------------------------------- rewriting
    def _rewrite(self, graph: gs.Graph, L: _Layer, moments: dict[str, _InputStats], whiten: bool) -> None:
        acc = moments[L.x.name].accs[L.layout] if whiten else None
        if acc is not None:
            A, B, _ = whitened_svd(L.W, self._whitening_matrix(L, acc), L.rank, self.options.eps)
        else:
            A, B = truncated_svd(L.W, L.rank)
        bias = L.bias
        if acc is not None and L.can_add_bias:
            bias = corrected_bias(L.W, A, B, acc.mean(), L.bias)
        if acc is not None:
            L.row["exact_error"] = round(relative_output_error(L.W, A, B, acc.second_moment(), acc.mean(),
                                                               L.bias, bias), 6)
        A, B = A.astype(L.dtype), B.astype(L.dtype)
        base = L.node.name or L.node.outputs[0].name
        a_c = gs.Constant(unique_name(graph, f"{base}_lowrank_A"), A)
        b_c = gs.Constant(unique_name(graph, f"{base}_lowrank_B"), B)
        h = gs.Variable(unique_name(graph, f"{base}_lowrank_h"), dtype=L.dtype)
        node = L.node
        first_name = unique_name(graph, f"{base}_lowrank_0")
        if L.kind == "MatMul":
            first = gs.Node("MatMul", first_name, inputs=[L.x, a_c], outputs=[h])
            node.inputs[0] = h
            node.inputs[1] = b_c
            if L.bias_add is not None and bias is not None:
                self._set_add_bias(graph, L, bias)
        elif L.kind == "Gemm":
            first = gs.Node("Gemm", first_name, attrs={"transA": int(node.attrs.get("transA", 0))},
                            inputs=[L.x, a_c], outputs=[h])
            attrs: dict[str, Any] = {"alpha": 1.0, "transA": 0, "transB": 0}
            inputs = [h, b_c]
            if bias is not None and L.can_add_bias:
                inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_C"), bias.astype(L.dtype)))
                attrs["beta"] = 1.0
            elif len(node.inputs) > 2:
                inputs.append(node.inputs[2])
                attrs["beta"] = float(node.attrs.get("beta", 1.0))
            node.inputs.clear()
            node.inputs.extend(inputs)
            node.attrs.clear()
            node.attrs.update(attrs)
        else:
            spatial = L.spatial
            a_c.values = np.ascontiguousarray(A.T.reshape(L.rank, L.m, *spatial))
            b_c.values = np.ascontiguousarray(B.T.reshape(L.n, L.rank, *spatial))
            keep = {k: v for k, v in node.attrs.items() if k in ("dilations", "kernel_shape")}
            first = gs.Node("Conv", first_name, attrs=dict(keep), inputs=[L.x, a_c], outputs=[h])
            inputs = [h, b_c]
            if bias is not None:
                inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_bias"), bias.astype(L.dtype)))
            node.inputs.clear()
            node.inputs.extend(inputs)
            node.attrs.clear()
            node.attrs.update(keep)
        graph.nodes.append(first)

    @staticmethod
    def _set_add_bias(graph: gs.Graph, L: _Layer, bias: np.ndarray) -> None:
        add = L.bias_add
        k = 1 if add.inputs[0] is L.node.outputs[0] else 0
        shape = np.asarray(constant_value(add.inputs[k])).shape
        add.inputs[k] = gs.Constant(unique_name(graph, f"{L.node.name}_lowrank_bias"),
                                    bias.reshape(shape).astype(L.dtype))

    # ---------------------------------------------------------------- measuring
    def _measure(self, before: onnx.ModelProto, graph: gs.Graph, done: list[_Layer], ctx: PassContext) -> None:
        """Relative error of each factorized layer's output inside the rewritten model vs the original."""
        after = export_model(graph)
        names = [L.out.name for L in done]
        samples = [s for _, s in zip(range(self.options.measure), ctx.calibration)]
        ref = observe(before, samples, names, lambda _: _Keep(), desc="lowrank: measuring (original)")
        new = observe(after, samples, names, lambda _: _Keep(), desc="lowrank: measuring (factorized)")
        for L in done:
            a, b = ref[L.out.name].values, new[L.out.name].values
            num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
            den = sum(float(np.sum(x.astype(np.float64) ** 2)) for x in a)
            L.row["measured_error"] = round(float(np.sqrt(num / den)), 6) if den > 0 else 0.0


class _Keep:
    """Observer keeping every array (a handful of samples for the measured error)."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.values.append(np.array(x))


# -------------------------------------------------------------------- timing
def _layer_models(L: _Layer, rank: int) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
    """Single-layer dense and factorized models of L's shape (random weights) and a feed."""
    rng = np.random.default_rng(0)
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(L.dtype))
    m, n, r = L.m, L.n, rank

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(L.dtype) * 0.1, name)

    has_bias = L.bias is not None or (L.kind == "Gemm" and len(L.node.inputs) > 2)
    xshape = L.in_shape
    if L.kind == "MatMul":
        dense_nodes = [onnx.helper.make_node("MatMul", ["x", "W"], ["y0"])]
        fact_nodes = [onnx.helper.make_node("MatMul", ["x", "A"], ["h"]),
                      onnx.helper.make_node("MatMul", ["h", "B"], ["y0"])]
        dense_inits, fact_inits = [init("W", (m, n))], [init("A", (m, r)), init("B", (r, n))]
        tail = [onnx.helper.make_node("Add", ["y0", "b"], ["y"])] if has_bias else \
            [onnx.helper.make_node("Identity", ["y0"], ["y"])]
        dense_nodes += tail
        fact_nodes += tail
        extra = [init("b", (n,))] if has_bias else []
    elif L.kind == "Gemm":
        ta = int(L.node.attrs.get("transA", 0))
        dense_nodes = [onnx.helper.make_node("Gemm", ["x", "W"] + (["b"] if has_bias else []), ["y"], transA=ta)]
        fact_nodes = [onnx.helper.make_node("Gemm", ["x", "A"], ["h"], transA=ta),
                      onnx.helper.make_node("Gemm", ["h", "B"] + (["b"] if has_bias else []), ["y"])]
        dense_inits, fact_inits = [init("W", (m, n))], [init("A", (m, r)), init("B", (r, n))]
        extra = [init("b", (n,))] if has_bias else []
    else:
        sp = (1,) * (len(xshape) - 2)
        dense_nodes = [onnx.helper.make_node("Conv", ["x", "W"] + (["b"] if has_bias else []), ["y"])]
        fact_nodes = [onnx.helper.make_node("Conv", ["x", "A"], ["h"]),
                      onnx.helper.make_node("Conv", ["h", "B"] + (["b"] if has_bias else []), ["y"])]
        dense_inits, fact_inits = [init("W", (n, m) + sp)], [init("A", (r, m) + sp), init("B", (n, r) + sp)]
        extra = [init("b", (n,))] if has_bias else []

    def model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
        g = onnx.helper.make_graph(nodes, "layer", [onnx.helper.make_tensor_value_info("x", elem, xshape)],
                                   [onnx.helper.make_tensor_value_info("y", elem, None)], inits + extra)
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])

    feed = {"x": rng.standard_normal(xshape).astype(L.dtype)}
    return model(dense_nodes, dense_inits), model(fact_nodes, fact_inits), feed


def timing_key(L: _Layer, rank: int) -> str:
    """Cache key of one dense-vs-factorized timing: op, input shape, weight shape, rank, bias, dtype."""
    bias = L.bias is not None or (L.kind == "Gemm" and len(L.node.inputs) > 2)
    return (f"{L.kind}|x={'x'.join(map(str, L.in_shape))}|w={L.m}x{L.n}|r={rank}|bias={int(bias)}|"
            f"tA={int(L.node.attrs.get('transA', 0))}|{np.dtype(L.dtype).name}")


def _time_layer(L: _Layer, rank: int) -> tuple[float, float]:
    """(dense seconds, factorized seconds) for L's shape at `rank`, from the timing cache or measured."""
    cache = TimingCache("lowrank")
    key = timing_key(L, rank)
    hit = cache.get(key)
    if hit is not None and len(hit) == 2:
        return hit[0], hit[1]
    dense, fact, feed = _layer_models(L, rank)
    t = cache.measure(key, [dense, fact], feed, runs=30)
    return t[0], t[1]
