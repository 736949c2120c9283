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

This module is the pass and the order of its steps; the steps are in `layers` (finding layers),
`statistics` (calibration data), `ranks` (rank choice), `timing` and `rewrite`.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import export_model
from onnxopt.kernels.lowrank_budget import factor_params
from onnxopt.passes.lowrank.layers import Layer, collect_layers, rebind, share_input, skip_rows
from onnxopt.passes.lowrank.options import LowRankOptions
from onnxopt.passes.lowrank.ranks import RankChooser, rank_row
from onnxopt.passes.lowrank.rewrite import apply_layer, factor_layer
from onnxopt.passes.lowrank.statistics import (
    InputStats,
    error_curve,
    finite_inputs,
    measure_errors,
    observe_inputs,
    set_input_shapes,
)
from onnxopt.passes.lowrank.summary import summary_line
from onnxopt.report.tables import count_reasons
from onnxopt.verify.accuracy_guard import GuardWording, Split, guard_not_run, run_guard, split_samples, trial_graph

#: How the accuracy guard's verdict names the pass's changes (factorized layers, least harmful first).
_WORDING = GuardWording(
    kept="chosen layers kept factorized",
    full="all chosen",
    failed="even with only the least harmful layer factorized",
)


@register_pass("lowrank")
class LowRank(Pass):
    """Factorize Gemm/MatMul/1x1-Conv weights into two thinner products where fewer parameters and faster."""

    @classmethod
    def summarize(cls, record: dict) -> str:
        """One terminal line for a run's record (its stats and per-layer rows)."""
        return summary_line(record)

    tolerance = "approximate"
    idempotent = False  # its parameter budget is relative to the model it is given: a second run factorizes more

    Options = LowRankOptions
    options: LowRankOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return _Run(self.options, self.name, graph, ctx).execute()


def _saved(L: Layer) -> int:
    """Weight parameters the layer saves at its rank."""
    return L.m * L.n - factor_params(L.m, L.n, L.rank)


class _Run:
    """One run of the pass: the steps in order, and the report they build up."""

    def __init__(self, o: LowRankOptions, name: str, graph: gs.Graph, ctx: PassContext) -> None:
        self.o, self.graph, self.ctx = o, graph, ctx
        self.whiten = o.method == "whiten" or (o.method == "auto" and ctx.calibration is not None)
        if self.whiten:
            ctx.require_calibration(name)
        self.skipped: list[dict[str, str]] = []
        self.moments: dict[str, InputStats] = {}
        #: The budget the report names: the global one given, else the per-layer energy.
        self.budget = (
            {"params": o.params}
            if o.params is not None
            else {"error": o.error}
            if o.error is not None
            else {"energy": o.energy}
        )
        self.stats: dict[str, Any] = {}

    def execute(self) -> PassResult:
        """Find layers, choose ranks, back off under the guard, rewrite, and report."""
        o = self.o
        layers = self.candidates()
        why = self.nothing_to_do(layers)
        if why is not None:
            return PassResult(False, {**self.stats, "factorized": 0}, self.skipped, reason=why)
        model = export_model(self.graph)
        split = self.observe(model, layers)
        layers = self.choose(model, layers)
        done = [L for L in layers if L.rank > 0]
        for L in done:
            factor_layer(L, self.moments, self.whiten, o.eps)
        total = sum(L.m * L.n for L in layers)
        asked = sum(_saved(L) for L in done)
        done, guard_why = self.guarded(model, done, split)
        for L in done:
            apply_layer(self.graph, L)
        self.record(done, total, asked)
        calib = self.ctx.calibration
        if done and o.measure and calib is not None:
            measure_errors(model, self.graph, done, [s for _, s in zip(range(o.measure), calib)])
        return self.result(layers, done, guard_why)

    def candidates(self) -> list[Layer]:
        """The factorizable layers (merged by input with `share`); starts the report's stats."""
        o = self.o
        layers = collect_layers(self.graph, o.ops, o.min_params, self.skipped)
        if o.share:
            layers = share_input(layers)
        self.stats = {"candidates": len(layers), "method": "whiten" if self.whiten else "svd", **self.budget}
        return layers

    def observe(self, model: onnx.ModelProto, layers: list[Layer]) -> Split | None:
        """Split the calibration data (None without data) and stream the layers' inputs on the fitting part."""
        o, calib = self.o, self.ctx.calibration
        split = split_samples(calib, o.holdout, o.guard_samples, model) if calib is not None else None
        if split is not None:
            self.moments = observe_inputs(model, layers, split.fit, self.whiten)
        return split

    def result(self, layers: list[Layer], done: list[Layer], guard_why: str) -> PassResult:
        """The pass's result: the per-layer rows and, when nothing was factorized, the leading reasons."""
        rows = [L.row for L in layers if L.row]
        why = (
            guard_why
            or count_reasons(rows, "decision", 3)
            or count_reasons(self.skipped, limit=3)
            or "no rank within the budget"
        )
        return PassResult(
            bool(done), self.stats, self.skipped, rows, reason="" if done else f"no layer factorized: {why}"
        )

    def nothing_to_do(self, layers: list[Layer]) -> str | None:
        """Why the pass ends before any data is read (no layer, or a budget of nothing); None to go on."""
        o = self.o
        if layers and not (o.params is not None and o.params <= 0) and not (o.error is not None and o.error <= 0):
            return None
        if layers:
            return "the budget removes nothing"
        found = count_reasons(self.skipped, limit=3)
        why = f"no factorizable layer among {'|'.join(o.ops)} (at least {o.min_params} weight parameters)"
        return why + (f": {found}" if found else "")

    def choose(self, model: onnx.ModelProto, layers: list[Layer]) -> list[Layer]:
        """The layers with finite input statistics, with their input shapes, error curves and ranks."""
        layers = finite_inputs(layers, self.moments, self.skipped)
        set_input_shapes(model, layers, self.moments, self.ctx)
        for L in layers:
            L.curve = error_curve(L, self.moments, self.whiten, self.o.eps)
        RankChooser(self.o).choose(layers, self.skipped)
        return layers

    def guarded(self, model: onnx.ModelProto, done: list[Layer], split: Split | None) -> tuple[list[Layer], str]:
        """The factorized layers the accuracy guard keeps (all when it does not run), and why none if none;
        the kept ones are refit on every sample when some were held out."""
        if not done:
            return done, ""
        if self.o.min_cosine <= 0 or split is None:
            self.stats["guard"] = guard_not_run(self.o.min_cosine)
            return done, ""
        done, why = self.guard(model, done, split)
        if done and self.whiten and split.held_out:
            # the choice is made; fit its factors on every sample, held-out ones included
            held = observe_inputs(model, done, split.held, self.whiten)
            for name, st in held.items():
                self.moments[name].merge(st)
            for L in done:
                factor_layer(L, self.moments, self.whiten, self.o.eps)
        return done, why

    def guard(self, model: onnx.ModelProto, chosen: list[Layer], split: Split) -> tuple[list[Layer], str]:
        """The chosen layers to keep factorized so the model's outputs meet `min_cosine`, and why none if none.

        Layers are ordered by predicted error per parameter saved (the allocator's own measure, from
        the calibration data), and the guard bisects for the longest prefix that still meets the
        target measured end to end; the others get their full rank back.
        """
        o = self.o
        order = sorted(chosen, key=lambda L: float(L.computed_curve[L.rank]) / max(_saved(L), 1))

        def build(k: int) -> onnx.ModelProto:
            trial = trial_graph(model)
            for L in order[:k]:
                apply_layer(trial, rebind(L, trial))
            return export_model(trial)

        out = run_guard(model, split.guard, o.min_cosine, split.held_out, len(order), build, self.stats, _WORDING)
        kept, back = order[: out.kept], order[out.kept :]
        for L in back:
            tried = L.rank
            L.row.update(rank_row(L, 0))
            L.row.update(
                guard_rank=tried,
                decision=f"dense kept by the accuracy guard (rank {tried} pushed the "
                f"output cosine below min_cosine={o.min_cosine})",
            )
            L.rank, L.factors = 0, None
            self.skipped.extend(skip_rows(L, L.row["decision"]))
        return kept, "" if kept else self.stats["guard"]

    def record(self, done: list[Layer], total: int, asked: int) -> None:
        """The parameter and MAC counts of the report."""
        removed = sum(_saved(L) for L in done)
        self.stats.update(
            factorized=len(done),
            params_candidates=total,
            params_removed=removed,
            fraction_removed=round(removed / total, 4) if total else 0.0,
            fraction_chosen_before_guard=round(asked / total, 4) if total else 0.0,
            macs_removed=sum(L.row.get("macs_saved", 0) for L in done),
        )
        if done and removed < asked:
            self.stats["guard"] += f"; removed {removed / total:.3f} of the parameters (chosen {asked / total:.3f})"
