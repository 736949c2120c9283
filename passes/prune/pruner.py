"""Structured pruning: remove whole channels from the graph, with compensation instead of fine-tuning.

Uses the `channel_groups` analysis (onnxopt.passes.prune.channels) to know which tensors,
weights, biases, BN parameters, per-channel constants, Concat/Split/Slice
bounds, Reshape shapes and depthwise `group` attributes carry each channel,
picks channels under a MAC budget (kernels/pruning.py), folds what the removed
channels contributed into the consumers (their mean into the bias, or a ridge
least-squares refit of the consumers' weights on calibration activations), and
slices everything so the saved model is physically smaller.
Exact mode removes only channels that are provably constant (all-zero weights
and bias at every source), folding the constant into the consumers' bias, so
the outputs do not change.

This module is the pass and the order of its steps; the steps are in `plan` (the run's state),
`selection` (candidates, scores, compensation), `exact` (dead channels), `rewrite` (the slicing)
and `report` (the per-group table).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import export_model
from onnxopt.kernels import pruning as K
from onnxopt.passes.prune.channel_model import ChannelGroups
from onnxopt.passes.prune.channels import CHANNEL_GROUPS
from onnxopt.passes.prune.exact import dead_classes
from onnxopt.passes.prune.options import PruneOptions
from onnxopt.passes.prune.plan import Plan, unchanged_stats
from onnxopt.passes.prune.report import group_rows, noop_reason
from onnxopt.passes.prune.rewrite import apply_removal
from onnxopt.passes.prune.selection import (
    calibration_stats,
    candidate_groups,
    compensate,
    finite_groups,
    score_channels,
)
from onnxopt.passes.prune.summary import summary_line
from onnxopt.verify.accuracy_guard import GuardWording, Split, guard_not_run, run_guard, split_samples

#: How the accuracy guard's verdict names the pass's changes (selection steps of the MAC budget).
_WORDING = GuardWording(
    kept="selection steps kept",
    full="full budget",
    failed="with only the first {least} of {total} selection steps",
)


@register_pass("prune")
class Prune(Pass):
    """Remove whole channels (structured pruning) under a MAC budget, compensating in the consumers."""

    @classmethod
    def summarize(cls, record: dict) -> str:
        """One terminal line for a run's record (its stats and per-layer rows)."""
        return summary_line(record)

    tolerance = "approximate"
    idempotent = False  # its MAC budget is relative to the model it is given: a second run prunes more

    Options = PruneOptions
    options: PruneOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cg: ChannelGroups = ctx.analysis(CHANNEL_GROUPS, graph)
        return _Run(Plan(graph, cg, ctx, self.options)).execute()


class _Run:
    """One run of the pass over a plan: the steps in order, and the report they build up."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.o = plan, plan.o
        cg = plan.cg
        #: Groups behind a barrier, for the report's skipped list.
        self.barriers = [
            {"node": g.name, "op": "channel group", "reason": "; ".join(g.barriers)} for g in cg.groups if g.barriers
        ]
        self.groups = candidate_groups(plan)
        self.stats: dict[str, Any] = {
            "groups": len(cg.groups),
            "candidate_groups": len(self.groups),
            "barrier_groups": sum(bool(g.barriers) for g in cg.groups),
        }
        self.scores: list[np.ndarray] = []

    def execute(self) -> PassResult:
        """Choose the channels (dead ones only in exact mode), compensate, and remove them."""
        if self.o.exact:
            removed, extra = dead_classes(self.plan, self.groups)
            self.stats.update(extra)
            return self.finish(removed, "dead")
        return self.approximate()

    def approximate(self) -> PassResult:
        """Score channels, select them under the MAC budget, back off under the guard, compensate."""
        o, plan = self.o, self.plan
        calib = plan.ctx.calibration
        criterion = o.criterion if o.criterion != "auto" else ("recon" if calib is not None else "l1")
        mode = o.compensate if o.compensate != "auto" else ("refit" if calib is not None else "none")
        if criterion in ("activation", "recon") or mode != "none":
            plan.ctx.require_calibration("prune")
        self.stats.update(compensation=mode, macs_requested=o.macs, macs_counted_at=plan.mac_shapes)
        why = self.nothing_to_budget()
        if why is not None:
            # decided before any calibration run or covariance: nothing here can be budgeted
            return self.unchanged(criterion, why)
        split = split_samples(calib, o.holdout, o.guard_samples, plan.model) if calib is not None else None
        cstats = calibration_stats(plan, split.fit, self.groups) if split is not None else None
        self.groups = finite_groups(plan, self.groups, cstats)
        self.scores = score_channels(plan, self.groups, criterion, cstats, mode)
        steps = K.select_channel_steps(
            self.scores,
            plan.node_macs,
            plan.memberships(self.groups),
            plan.sizes,
            o.macs,
            o.max_ratio,
            max(o.round_to, 1),
        )
        removed = plan.removal(self.groups, steps)
        if removed and o.min_cosine > 0 and split is not None:
            removed, why = self.guard(steps, mode, cstats, split)
            if not removed:
                return self.unchanged(criterion, why)
        elif removed:
            self.stats["guard"] = guard_not_run(o.min_cosine)
        if removed and mode != "none":
            self.stats.update(compensate(plan, removed, mode, cstats))
        return self.finish(removed, criterion)

    def nothing_to_budget(self) -> str | None:
        """Why no channel can be budgeted at all (no candidate, macs=0, layers counting 0 MACs); None if
        some can."""
        plan, groups = self.plan, self.groups
        if not groups:
            return noop_reason(plan, groups, self.barriers)
        if self.o.macs <= 0:
            return "the budget removes nothing (macs=0)"
        if not sum(m for m, u in zip(plan.node_macs, plan.touches(groups)) if u):
            return (
                f"the layers reading the {len(groups)} prunable groups count 0 MACs at the "
                f"{plan.mac_shapes} input shapes (shapes unknown: give --input-shape or --calib)"
            )
        return None

    def guard(self, steps: list[tuple[int, list[int]]], mode: str, cstats: Any, split: Split) -> tuple[set[int], str]:
        """The longest prefix of the selection steps whose pruned (and compensated) model meets `min_cosine`.

        Each trial prunes a fresh copy of the graph as the final rewrite will, compensated with the
        statistics of the fitting samples and measured on the held-out ones (the final compensation
        then uses every sample). Returns the classes to remove and, when none, why.
        """
        plan, groups = self.plan, self.groups

        def build(k: int) -> onnx.ModelProto:
            trial = plan.fork()
            removed = trial.removal(groups, steps[:k])
            if mode != "none":
                compensate(trial, removed, mode, cstats)
            apply_removal(trial, removed)
            return export_model(trial.graph)

        out = run_guard(
            plan.model, split.guard, self.o.min_cosine, split.held_out, len(steps), build, self.stats, _WORDING
        )
        if not out.kept:
            return set(), self.stats["guard"]
        if mode != "none" and split.held_out:
            # the channels are chosen; compensate with statistics of every sample, held-out ones included
            held_stats = calibration_stats(plan, split.held, groups)
            assert held_stats is not None  # held_out: there are held samples
            for name, st in held_stats.items():
                cstats[name].merge(st)
        return plan.removal(groups, steps[: out.kept]), ""

    def unchanged(self, criterion: str, why: str) -> PassResult:
        """The result of a run that removes no channel, for reason `why`."""
        plan = self.plan
        self.stats.update(unchanged_stats(plan, criterion))
        return PassResult(
            False,
            self.stats,
            self.barriers + plan.skipped,
            group_rows(plan, self.groups, self.scores, set()),
            reason=why,
        )

    def finish(self, removed: set[int], criterion: str) -> PassResult:
        """Report the MACs before and after, and remove the chosen channels from the graph."""
        plan, stats = self.plan, self.stats
        stats["criterion"] = criterion
        after = plan.macs_after(removed)
        details = group_rows(plan, self.groups, self.scores, removed)
        stats.update(
            {
                "removed_channels": len(removed),
                "macs_before": int(plan.macs_before),
                "macs_after": int(round(after)),
                "mac_reduction": round(1 - after / plan.macs_before, 4) if plan.macs_before else 0.0,
            }
        )
        if str(stats.get("guard", "")).startswith("backed off"):
            stats["guard"] += f"; MACs reduced by {stats['mac_reduction']:.3f} (asked {self.o.macs})"
        if removed:
            apply_removal(plan, removed)
        return PassResult(
            changed=bool(removed),
            stats=stats,
            skipped=self.barriers + plan.skipped,
            details=details,
            reason="" if removed else noop_reason(plan, self.groups, self.barriers),
        )
