"""What the prune pass reports: a row per channel group (channels and MACs before and after, the
score of what was removed) and, when nothing was removed, why."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxopt.passes.prune.channel_model import Group
from onnxopt.passes.prune.plan import Plan
from onnxopt.report.tables import count_reasons


def noop_reason(plan: Plan, groups: list[int], skipped: list[dict[str, str]]) -> str:
    """Why no channel was removed, for the report."""
    o = plan.o
    if not plan.cg.groups:
        return "no channel group: the model has no prunable Conv/Gemm/MatMul layer"
    if not groups:
        why = count_reasons(skipped + plan.skipped, limit=2)
        return f"none of the {len(plan.cg.groups)} channel groups can be pruned" + (
            f" ({why})" if why else " (protected or not prunable)"
        )
    if o.exact:
        return f"no provably dead channel in {len(groups)} prunable groups"
    return (
        f"no channel chosen in {len(groups)} prunable groups under macs={o.macs}, "
        f"max_ratio={o.max_ratio}, round_to={o.round_to}"
    )


def group_rows(plan: Plan, groups: list[int], scores: list[np.ndarray], removed: set[int]) -> list[dict[str, Any]]:
    """One report row per channel group."""
    sc = dict(zip(groups, scores))
    rows = []
    for gi, g in enumerate(plan.cg.groups):
        row = _group_row(plan, gi, g, removed)
        gone = [j for j, c in enumerate(g.classes) if c in removed]
        if gi in sc and len(sc[gi]):
            s = sc[gi]
            row["score_removed"] = float(s[gone].sum()) if gone else 0.0
            row["predicted_error"] = float(s[gone].sum() / max(s.sum(), 1e-30)) if gone else 0.0
        if g.barriers:
            row["barriers"] = g.barriers
        rows.append(row)
    return rows


def _group_row(plan: Plan, gi: int, g: Group, removed: set[int]) -> dict[str, Any]:
    """Channels and MACs (of the layers creating or reading its channels) of group `gi`."""
    n = len(g.classes)
    gone = sum(c in removed for c in g.classes)
    touched = [k for k, sides in enumerate(plan.red_roots) if _touches_group(plan, sides, gi)]
    return {
        "group": g.name,
        "sources": len(g.sources),
        "channels_before": n,
        "channels_after": n - gone,
        "macs_before": int(sum(plan.node_macs[k] for k in touched)),
        "macs_after": int(round(sum(plan.node_after[k] for k in touched))),
    }


def _touches_group(plan: Plan, sides: tuple[np.ndarray, np.ndarray | None], gi: int) -> bool:
    """Does a layer (its output and input channel classes) create or read a channel of group `gi`?"""
    out_roots, in_roots = sides
    cg = plan.cg
    return cg.class_group.get(int(out_roots[0])) == gi or (
        in_roots is not None
        and len(in_roots) > 0
        and any(cg.class_group.get(int(c)) == gi for c in np.unique(in_roots))
    )
