"""The `lowrank` pass: factorize constant Gemm/MatMul/1x1-Conv weights W (m x n) into A (m x r) @ B (r x n).

A layer y = x W + b becomes y = (x A) B + b' only where it pays twice: the
rank saves parameters and MACs (r < m n / (m + n)) and the factorized form of
that layer shape is faster than the dense one on onnxruntime's CPU EP (both
timed, cached on disk by shape). Ranks come from a per-layer energy threshold
or a global parameter / error budget. With calibration data the factors are
whitened by the layer's input covariance (SVD-LLM / ASVD), so the discarded
singular values are the real output error, and the bias absorbs the mean of
that error; without data it is a plain truncated SVD of W. Layers reading the
same input may share the first factor (`share`). 1x1 Convs are handled as
Gemms over channels but are opt-in (`ops=Gemm|MatMul|Conv`): on PP-OCRv4 rec,
per-layer errors that look small compound through the CNN backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.accuracy_guard import AccuracyGuard, GuardOptions, split_samples
from onnxopt.calibration import observe
from onnxopt.graph import constant_value, export_model, import_model, unique_name
from onnxopt.kernels.quant import all_finite
from onnxopt.kernels.lowrank import (CovarianceAccumulator, energy_rank, max_useful_rank, round_rank, truncated_svd,
                                     whitened_svd)
from onnxopt.kernels.lowrank_budget import (LayerCurve, allocate_ranks, allowed_ranks, corrected_bias,
                                            factor_params, output_energy, plain_error_curve,
                                            relative_output_error, whitened_error_curve)
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.registry import register_pass
from onnxopt.report import count_reasons
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
    #: Layers sharing one first factor (a group reading the same input); empty for a single layer.
    members: list["_Layer"] = field(default_factory=list)
    #: The factors (A, B) and the bias to write (None: keep the layer's own), once the rank is final.
    factors: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

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

    def merge(self, other: "_InputStats") -> None:
        """Add the sums of another pass over more samples (layouts this one also observes)."""
        for layout, acc in self.accs.items():
            if layout in other.accs:
                acc.merge(other.accs[layout])


def _finite_inputs(layers: list[_Layer], moments: dict[str, _InputStats], skipped: list[dict[str, str]]
                   ) -> list[_Layer]:
    """The layers whose observed input statistics are finite; the others stay dense, listed in `skipped`
    (an inf/NaN upstream reaches them on the calibration data, and no factorization can be fit to it)."""
    kept = []
    for L in layers:
        st = moments.get(L.x.name)
        if st is not None and not all(acc.finite() for acc in st.accs.values()):
            skipped.extend({"node": M.node.name, "op": M.kind, "reason": "input holds inf/NaN on the calibration "
                            "data: left dense"} for M in L.members or [L])
            continue
        kept.append(L)
    return kept


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
    class Options(GuardOptions):
        """The guard's options (`min_cosine`, ...) come first; with the guard, the layers that cost most error
        per parameter saved stay dense."""

        energy: float = option(0.98, "per-layer share of the (whitened, with data) spectrum's energy to keep, "
                                     "when no global budget is given", above=0, high=1)
        params: float | None = option(None, "global budget: fraction of the factorizable layers' parameters to "
                                            "remove (e.g. 0.3)", low=0, below=1)
        error: float | None = option(None, "global budget: root-sum-square of the layers' relative output "
                                           "errors on the calibration data (weight errors with method=svd)",
                                     low=0)
        multiple: int = option(8, "round ranks to a multiple of this (hardware-friendly widths)", low=1)
        method: str = option("auto", "auto (whiten with calibration data, else svd) | whiten | svd",
                             choices=("auto", "whiten", "svd"))
        timing: bool = option(True, "time dense vs factorized on onnxruntime CPU and keep the faster")
        min_speedup: float = option(1.05, "factorize only where dense/factorized time >= this", above=0)
        rounds: int = option(4, "budget re-allocations after layers lose to their dense form in timing", low=0)
        measure: int = option(4, "calibration samples for the measured (in-model) error; 0 = skip", low=0)
        ops: list[str] = option(["Gemm", "MatMul"], "layer types to factorize; add Conv for 1x1 convolutions "
                                                    "(opt-in: errors in a CNN backbone compound, see bench/lowrank)",
                                 choices=("Gemm", "MatMul", "Conv"))
        share: bool = option(False, "layers reading the same input (Q, K, V projections) share the first "
                                    "factor: x A is computed once")
        min_params: int = option(1024, "leave layers with fewer weight parameters alone", low=0)
        eps: float = option(1e-6, "damping of the covariance, relative to its mean diagonal", low=0)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        whiten = o.method == "whiten" or (o.method == "auto" and ctx.calibration is not None)
        if whiten:
            ctx.require_calibration(self.name)
        skipped: list[dict[str, str]] = []
        layers = self._collect(graph, skipped)
        if o.share:
            layers = _share(layers)
        budget = {"params": o.params} if o.params is not None else {"error": o.error} if o.error is not None \
            else {"energy": o.energy}
        stats: dict[str, Any] = {"candidates": len(layers), "method": "whiten" if whiten else "svd", **budget}
        if not layers or (o.params is not None and o.params <= 0) or (o.error is not None and o.error <= 0):
            why = "the budget removes nothing" if layers else \
                f"no factorizable layer among {'|'.join(o.ops)} (at least {o.min_params} weight parameters)"
            found = count_reasons(skipped, limit=3)
            return PassResult(False, {**stats, "factorized": 0}, skipped,
                              reason=why + (f": {found}" if found and not layers else ""))
        model = export_model(graph)
        split = (split_samples(ctx.calibration, o.holdout, o.guard_samples, model)
                 if ctx.calibration is not None else None)
        moments = self._observe(model, layers, split.fit, whiten) if split is not None else {}
        layers = _finite_inputs(layers, moments, skipped)
        self._shapes(model, layers, moments, ctx)
        for L in layers:
            L.curve = self._curve(L, moments, whiten)
        self._choose(layers, skipped)
        done = [L for L in layers if L.rank > 0]
        for L in done:
            self._factor(L, moments, whiten)
        total = sum(L.m * L.n for L in layers)
        asked = sum(L.m * L.n - factor_params(L.m, L.n, L.rank) for L in done)
        guard_why = ""
        if done and o.min_cosine <= 0:
            stats["guard"] = "off (min_cosine=0)"
        elif done and split is None:
            stats["guard"] = "not measured: no calibration data (give --calib to bound the output error)"
        elif done:
            done, guard_why = self._guard(model, done, split.guard, split.held_out, stats, skipped)
            if done and whiten and split.held_out:
                # the choice is made; fit its factors on every sample, held-out ones included
                held = self._observe(model, done, split.held, whiten)
                for name, st in held.items():
                    moments[name].merge(st)
                for L in done:
                    self._factor(L, moments, whiten)
        for L in done:
            self._apply(graph, L)
        removed = sum(L.m * L.n - factor_params(L.m, L.n, L.rank) for L in done)
        stats.update(factorized=len(done), params_candidates=total, params_removed=removed,
                     fraction_removed=round(removed / total, 4) if total else 0.0,
                     fraction_chosen_before_guard=round(asked / total, 4) if total else 0.0,
                     macs_removed=sum(L.row.get("macs_saved", 0) for L in done))
        if done and removed < asked:
            stats["guard"] += f"; removed {removed / total:.3f} of the parameters (chosen {asked / total:.3f})"
        if done and o.measure and ctx.calibration is not None:
            self._measure(model, graph, done, ctx)
        rows = [L.row for L in layers if L.row]
        why = guard_why or count_reasons(rows, "decision", 3) or count_reasons(skipped, limit=3) \
            or "no rank within the budget"
        return PassResult(bool(done), stats, skipped, rows, reason="" if done else f"no layer factorized: {why}")

    # ---------------------------------------------------------------- the accuracy guard
    def _guard(self, model: onnx.ModelProto, chosen: list[_Layer], samples: list, held_out: bool,
               stats: dict[str, Any], skipped: list[dict[str, str]]) -> tuple[list[_Layer], str]:
        """The chosen layers to keep factorized so the model's outputs meet `min_cosine`, and why none if none.

        Layers are ordered by predicted error per parameter saved (the allocator's own measure, from
        the calibration data), and the guard bisects for the longest prefix that still meets the
        target measured end to end; the others get their full rank back.
        """
        o = self.options
        order = sorted(chosen, key=lambda L: float(L.curve[L.rank]) / max(L.m * L.n - factor_params(L.m, L.n,
                                                                                                    L.rank), 1))
        guard = AccuracyGuard(model, samples, o.min_cosine)

        def build(k: int) -> onnx.ModelProto:
            trial = import_model(model)
            trial._onnxopt_names = None  # as the pass manager does: names are collected on first use
            for L in order[:k]:
                self._apply(trial, _rebind(L, trial))
            return export_model(trial)

        out = guard.search(len(order), build)
        stats.update(out.stats(len(order), o.min_cosine, held_out, len(samples)))
        where = f"{len(samples)} {'held-out' if held_out else 'calibration (not held-out)'} samples"
        kept, back = order[:out.kept], order[out.kept:]
        for L in back:
            tried = L.rank
            L.row.update(self._row(L, 0))
            L.row.update(guard_rank=tried, decision=f"dense kept by the accuracy guard (rank {tried} pushed the "
                                                   f"output cosine below min_cosine={o.min_cosine})")
            L.rank, L.factors = 0, None
            skipped.extend({"node": M.node.name, "op": M.kind, "reason": L.row["decision"]}
                           for M in L.members or [L])
        if not back:
            stats["guard"] = f"met: output cosine {out.cosine:.4f} >= {o.min_cosine} on {where}"
            return kept, ""
        if not kept:
            least = min(out.trials, key=lambda t: t.kept).cosine  # the least harmful layer alone
            why = (f"the accuracy guard measured output cosine {least:.4f} < min_cosine={o.min_cosine} on {where} "
                   f"even with only the least harmful layer factorized; the model is left unchanged")
            stats["guard"] = why
            return [], why
        stats["guard"] = (f"backed off: {len(kept)} of {len(order)} chosen layers kept factorized, output cosine "
                          f"{out.cosine:.4f} >= {o.min_cosine} on {where} (all chosen: {out.trials[0].cosine:.4f})")
        return kept, ""

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
        if not all_finite(w):
            return "weight holds inf/NaN: left dense", None
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
    def _observe(self, model: onnx.ModelProto, layers: list[_Layer], calib: Any,
                 covariance: bool) -> dict[str, _InputStats]:
        """Stream the calibration data: input covariances (when whitening) and the largest input shapes."""
        dims: dict[str, dict[str, int]] = {}
        for L in layers:
            dims.setdefault(L.x.name, {})
            if covariance:
                dims[L.x.name][L.layout] = L.m
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
                L.cap = self._fast_cap(L) if budget else 0
                L.rank = 0
        for L in layers:
            if L.rank > 0:
                L.row.pop("why", None)
                L.row["decision"] = "factorized"
                continue
            reason = L.row.pop("why", None) or "dense kept: no rank within the budget"
            L.row.update(self._row(L, 0), decision=reason)
            L.row.setdefault("dense_us", None)
            L.row.setdefault("factorized_us", None)
            skipped.extend({"node": M.node.name, "op": M.kind, "reason": reason} for M in L.members or [L])

    def _fast_cap(self, L: _Layer) -> int:
        """Largest allowed rank below L.rank whose factorized form wins in timing (binary search; 0 if none).

        Factorized time falls with the rank, so the winning ranks form a tail of the descending list.
        """
        lost_at, row = L.rank, dict(L.row)
        ranks = allowed_ranks(L.m, L.n, self.options.multiple, lost_at - 1)
        lo, hi, best = 0, len(ranks) - 1, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            L.rank = ranks[mid]
            if self._faster(L):
                best, hi = ranks[mid], mid - 1
            else:
                lo = mid + 1
        L.row = row  # keep the timing that made the layer lose until it is chosen again
        return best

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
        return {"node": "+".join(M.node.name or M.node.outputs[0].name for M in L.members or [L]), "op": L.kind, "m": L.m, "n": L.n, "rows": rows,
                "input_shape": list(L.in_shape), "bias": _has_bias(L), "rank": r,
                "max_useful_rank": max_useful_rank(L.m, L.n),
                "energy_kept": round(1.0 - err2, 6),
                "predicted_error": round(float(np.sqrt(err2)), 6),
                "params_saved": L.m * L.n - factor_params(L.m, L.n, r),
                "macs_saved": rows * (L.m * L.n - factor_params(L.m, L.n, r))}

    # ---------------------------------------------------------------- rewriting
    def _factor(self, L: _Layer, moments: dict[str, _InputStats], whiten: bool) -> None:
        """Compute the layer's factors at its chosen rank (and the corrected bias) into `L.factors`."""
        acc = moments[L.x.name].accs[L.layout] if whiten else None
        if acc is not None:
            A, B, _ = whitened_svd(L.W, self._whitening_matrix(L, acc), L.rank, self.options.eps)
        else:
            A, B = truncated_svd(L.W, L.rank)
        bias = L.bias if L.can_add_bias else None
        if acc is not None and L.can_add_bias:
            bias = corrected_bias(L.W, A, B, acc.mean(), L.bias)
        if acc is not None:
            L.row["exact_error"] = round(relative_output_error(L.W, A, B, acc.second_moment(), acc.mean(),
                                                               L.bias, bias if L.can_add_bias else L.bias), 6)
        L.factors = (A.astype(L.dtype), B.astype(L.dtype), bias)

    def _apply(self, graph: gs.Graph, L: _Layer) -> None:
        """Replace the layer (or each member of a shared group) by its two thinner products (`L.factors`)."""
        A, B, bias = L.factors
        base = L.node.name or L.node.outputs[0].name
        a_c = gs.Constant(unique_name(graph, f"{base}_lowrank_A"), A)
        h = gs.Variable(unique_name(graph, f"{base}_lowrank_h"), dtype=L.dtype)
        first_name = unique_name(graph, f"{base}_lowrank_0")
        if L.kind == "MatMul":
            first = gs.Node("MatMul", first_name, inputs=[L.x, a_c], outputs=[h])
        elif L.kind == "Gemm":
            first = gs.Node("Gemm", first_name, attrs={"transA": int(L.node.attrs.get("transA", 0))},
                            inputs=[L.x, a_c], outputs=[h])
        else:
            a_c.values = np.ascontiguousarray(A.T.reshape(L.rank, L.m, *L.spatial))
            keep = {k: v for k, v in L.node.attrs.items() if k in ("dilations", "kernel_shape")}
            first = gs.Node("Conv", first_name, attrs=keep, inputs=[L.x, a_c], outputs=[h])
        graph.nodes.append(first)
        offset = 0
        for M in L.members or [L]:
            part = slice(offset, offset + M.n)
            offset += M.n
            self._second_product(graph, M, h, B[:, part], None if bias is None else bias[part])

    def _second_product(self, graph: gs.Graph, L: _Layer, h: gs.Tensor, B: np.ndarray,
                        bias: np.ndarray | None) -> None:
        """Turn L's node into h @ B with the (corrected) bias; bias None keeps the layer's own bias as is."""
        node = L.node
        base = node.name or node.outputs[0].name
        b_c = gs.Constant(unique_name(graph, f"{base}_lowrank_B"), np.ascontiguousarray(B))
        if L.kind == "MatMul":
            node.inputs[0] = h
            node.inputs[1] = b_c
            if L.bias_add is not None and bias is not None:
                self._set_add_bias(graph, L, bias)
            return
        if L.kind == "Gemm":
            attrs: dict[str, Any] = {"alpha": 1.0, "transA": 0, "transB": 0}
            inputs = [h, b_c]
            if bias is not None:
                inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_C"), bias.astype(L.dtype)))
                attrs["beta"] = 1.0
            elif len(node.inputs) > 2:
                inputs.append(node.inputs[2])
                attrs["beta"] = float(node.attrs.get("beta", 1.0))
        else:
            b_c.values = np.ascontiguousarray(B.T.reshape(L.n, B.shape[0], *L.spatial))
            attrs = {k: v for k, v in node.attrs.items() if k in ("dilations", "kernel_shape")}
            inputs = [h, b_c]
            if bias is not None:
                inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_bias"), bias.astype(L.dtype)))
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.attrs.clear()
        node.attrs.update(attrs)

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
        names = [M.out.name for L in done for M in (L.members or [L])]
        samples = [s for _, s in zip(range(self.options.measure), ctx.calibration)]
        ref = observe(before, samples, names, lambda _: _Keep(), desc="lowrank: measuring (original)")
        new = observe(after, samples, names, lambda _: _Keep(), desc="lowrank: measuring (factorized)")
        for L in done:
            num = den = 0.0
            for M in L.members or [L]:
                a, b = ref[M.out.name].values, new[M.out.name].values
                num += sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
                den += sum(float(np.sum(x.astype(np.float64) ** 2)) for x in a)
            L.row["measured_error"] = round(float(np.sqrt(num / den)), 6) if den > 0 else 0.0


def _rebind(L: _Layer, graph: gs.Graph) -> _Layer:
    """The same layer (factors included) bound to the nodes and tensors of a re-imported copy of its graph."""
    nodes = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    tensors = graph.tensors()

    def bind(M: _Layer) -> _Layer:
        return replace(M, node=nodes[M.node.outputs[0].name], x=tensors[M.x.name],
                       bias_add=None if M.bias_add is None else nodes[M.bias_add.outputs[0].name],
                       out=None if M.out is None else tensors[M.out.name], row={},
                       members=[bind(N) for N in M.members])

    return bind(L)


def _share(layers: list[_Layer]) -> list[_Layer]:
    """Merge MatMul/Gemm layers reading the same input into one layer over the columns of [W1 W2 ...]."""
    groups: dict[tuple, list[_Layer]] = {}
    for L in layers:
        key = (L.x.name, L.kind, L.layout, np.dtype(L.dtype).name) if L.kind in ("MatMul", "Gemm") else (id(L),)
        groups.setdefault(key, []).append(L)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        first = members[0]
        can_bias = all(M.can_add_bias for M in members)
        bias = np.concatenate([M.bias if M.bias is not None else np.zeros(M.n) for M in members]) \
            if can_bias and any(M.bias is not None for M in members) else None
        out.append(_Layer(first.node, first.kind, first.x, np.hstack([M.W for M in members]), first.dtype,
                          first.layout, bias=bias, can_add_bias=can_bias, members=members))
    return out


class _Keep:
    """Observer keeping every array (a handful of samples for the measured error)."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.values.append(np.array(x))


# -------------------------------------------------------------------- timing
def layer_models(kind: str, in_shape: tuple[int, ...], m: int, n: int, rank: int, bias: bool = True,
                 dtype: np.dtype = np.dtype(np.float32), trans_a: int = 0, widths: list[int] | None = None
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
        g = onnx.helper.make_graph(nodes, "layer", [onnx.helper.make_tensor_value_info("x", elem, in_shape)],
                                   [onnx.helper.make_tensor_value_info("y", elem, None)], inits)
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])

    feed = {"x": rng.standard_normal(in_shape).astype(dtype)}
    return model(dense, ["W"], w_shapes[0]), model(fact, ["A", "B"], w_shapes[1]), feed


def _group_models(kind: str, in_shape: tuple[int, ...], m: int, rank: int, bias: bool, dtype: np.dtype,
                  widths: list[int]) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, np.ndarray]]:
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
        g = onnx.helper.make_graph(nodes, "group", [onnx.helper.make_tensor_value_info("x", elem, in_shape)],
                                   outs, inits)
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)])

    dense = model([], "x", [])
    fact = model([onnx.helper.make_node(op, ["x", "A"], ["h"])], "h", [init("A", (m, rank))])
    return dense, fact, {"x": rng.standard_normal(in_shape).astype(dtype)}


def _has_bias(L: _Layer) -> bool:
    return any(M.bias is not None or (M.kind == "Gemm" and len(M.node.inputs) > 2) for M in L.members or [L])


def timing_key(L: _Layer, rank: int) -> str:
    """Cache key of one dense-vs-factorized timing: op, input shape, weight shape, rank, bias, dtype."""
    return (f"{L.kind}|x={'x'.join(map(str, L.in_shape))}|w={L.m}x{L.n}|r={rank}|bias={int(_has_bias(L))}|"
            f"tA={int(L.node.attrs.get('transA', 0))}|{np.dtype(L.dtype).name}"
            + (f"|split={'+'.join(str(M.n) for M in L.members)}" if L.members else ""))


def _time_layer(L: _Layer, rank: int) -> tuple[float, float]:
    """(dense seconds, factorized seconds) for L's shape at `rank`, from the timing cache or measured."""
    cache = TimingCache("lowrank")
    key = timing_key(L, rank)
    hit = cache.get(key)
    if hit is not None and len(hit) == 2:
        return hit[0], hit[1]
    dense, fact, feed = layer_models(L.kind, L.in_shape, L.m, L.n, rank, _has_bias(L), L.dtype,
                                     int(L.node.attrs.get("transA", 0)), [M.n for M in L.members])
    t = cache.measure(key, [dense, fact], feed, runs=30)
    return t[0], t[1]
