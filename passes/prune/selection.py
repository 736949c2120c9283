"""Which channels the prune pass removes and how it makes up for them: the candidate groups, the
calibration statistics their consumers read, the channel scores, and the compensation (bias folds
or ridge refits) in the consumers once channels are chosen.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.data.observe import observe
from onnxopt.ir.ops import out_channel_axis
from onnxopt.kernels import pruning as K
from onnxopt.kernels.quant import all_finite
from onnxopt.passes.prune.channel_model import const_value
from onnxopt.passes.prune.plan import Plan

#: Consumer inputs wider than this get bias folding instead of a refit (a C x C solve each).
REFIT_MAX_CHANNELS = 4096


# ---- which groups may be pruned -------------------------------------------
def candidate_groups(plan: Plan) -> list[int]:
    """The prunable groups not protected by name and without inf/NaN weights (those go to `skipped`)."""
    touching: dict[int, set[str]] = defaultdict(set)
    for r, (out_roots, _) in zip(plan.red, plan.red_roots):
        for c in set(out_roots.tolist()):
            touching[plan.cg.class_group[c]].add(r.node.name)
    nonfinite = {
        n.name
        for n in plan.graph.nodes
        if any(isinstance(t, gs.Constant) and not all_finite(t.values) for t in n.inputs)
    }
    out = []
    for gi, g in enumerate(plan.cg.groups):
        if not g.prunable:
            continue
        names = set(g.sources) | touching[gi]
        if any(fnmatch.fnmatch(n, p) for n in names for p in plan.o.protect):
            continue
        if names & nonfinite:
            plan.skipped.append(
                {
                    "node": g.name,
                    "op": "channel group",
                    "reason": f"a weight of {sorted(names & nonfinite)[0]} holds inf/NaN: its channels are kept",
                }
            )
            continue
        out.append(gi)
    return out


def finite_groups(plan: Plan, groups: list[int], cstats: dict[str, K.ChannelStats] | None) -> list[int]:
    """`groups` less those whose consumers read inf/NaN on the calibration data (an inf/NaN upstream
    reaches them; no channel score or refit can be fit to it); those are listed in `skipped`."""
    bad = {t for t, st in (cstats or {}).items() if not st.cov.finite()}
    if not bad:
        return groups
    kept = []
    for gi in groups:
        if any(u and r.input_tensor in bad for r, u in zip(plan.red, plan.touches([gi]))):
            plan.skipped.append(
                {
                    "node": plan.cg.groups[gi].name,
                    "op": "channel group",
                    "reason": "its consumers read inf/NaN on the calibration data: its channels are kept",
                }
            )
        else:
            kept.append(gi)
    return kept


def calibration_stats(plan: Plan, calib: Any, groups: list[int]) -> dict[str, K.ChannelStats] | None:
    """Channel statistics of the inputs of the consumers of candidate channels (the only ones read)."""
    if calib is None:
        return None
    used = plan.touches(groups)
    tensors = sorted({r.consumed for r, u in zip(plan.red, used) if u})
    dims = {t: (plan.cg.tensors[t][0], len(plan.cg.tensors[t][1])) for t in tensors}
    return observe(
        plan.model, calib, tensors, lambda t: K.ChannelStats(*dims[t]), desc="prune: calibrating", total=len(calib)
    )


# ---- channel scores ---------------------------------------------------------------
class _Scores:
    """Per candidate group, a score per channel, summed over every place the channel is scored."""

    def __init__(self, plan: Plan, groups: list[int]) -> None:
        self.index = {c: (gi, j) for gi in groups for j, c in enumerate(plan.cg.groups[gi].classes)}
        self.out = {gi: np.zeros(len(plan.cg.groups[gi].classes)) for gi in groups}
        self.has = {gi: False for gi in groups}

    def add(self, roots: np.ndarray, vals: np.ndarray) -> None:
        """Add `vals` to the channels (classes) `roots`, marking their groups as scored."""
        for c, v in zip(roots.tolist(), vals.tolist()):
            if c in self.index:
                gi, j = self.index[c]
                self.out[gi][j] += v
                self.has[gi] = True


def score_channels(plan: Plan, groups: list[int], criterion: str, stats: Any, compensate: str) -> list[np.ndarray]:
    """Per candidate group, how much removing each channel costs under `criterion` (weight norms for
    groups the criterion could not score)."""
    sc = _Scores(plan, groups)
    if criterion == "bn":
        _bn_scores(plan, sc)
    elif criterion in ("activation", "recon"):
        _data_scores(plan, sc, groups, criterion, stats, compensate)
    if criterion in ("l1", "l2") or not all(sc.has.values()):
        _norm_scores(plan, sc, criterion)
    return [sc.out[gi] for gi in groups]


def _bn_scores(plan: Plan, sc: _Scores) -> None:
    """|gamma| / sqrt(var + eps) of the BatchNormalization each channel passes."""
    for s in plan.cg.sites:
        if s.kind == "const" and s.node.op == "BatchNormalization" and s.index == 1:
            gamma, var = const_value(s.node.inputs[1]), const_value(s.node.inputs[4])
            assert gamma is not None and var is not None  # the walk records const sites of constant statistics
            gamma, var = gamma.astype(np.float64), var.astype(np.float64)
            sc.add(plan.cg.roots(s.ids), np.abs(gamma) / np.sqrt(var + float(s.node.attrs.get("epsilon", 1e-5))))


def _data_scores(plan: Plan, sc: _Scores, groups: list[int], criterion: str, stats: Any, compensate: str) -> None:
    """Mean |activation| of each consumed channel, or the consumers' output error its removal causes
    (what compensation cannot recover)."""
    cond_cache: dict[str, np.ndarray] = {}
    used = plan.touches(groups)
    for k, r in enumerate(plan.red):
        if not used[k]:  # sums over no candidate channel: its statistics score nothing
            continue
        st = stats[r.consumed]
        if criterion == "activation":
            if r.consumed not in cond_cache:
                cond_cache[r.consumed] = st.mean_abs()
                sc.add(plan.in_roots(k), st.mean_abs())
            continue
        if r.consumed not in cond_cache:
            cond_cache[r.consumed] = _residual_variance(plan, st, compensate)
        sc.add(plan.in_roots(k), K.removal_error(plan.consumer_matrix(r), cond_cache[r.consumed]))


def _residual_variance(plan: Plan, st: K.ChannelStats, compensate: str) -> np.ndarray:
    """Per channel, the part of its signal the compensation cannot recover from the kept channels."""
    cov = st.covariance()
    if compensate == "refit" and len(cov) <= REFIT_MAX_CHANNELS:
        var = K.conditional_variance(cov, plan.o.ridge)
    elif compensate == "bias":
        var = np.diag(cov)
    else:
        var = np.diag(cov) + st.mean() ** 2
    return np.maximum(var, 0.0)


def _norm_scores(plan: Plan, sc: _Scores, criterion: str) -> None:
    """L1 (L2 for `l2`) norms of the producers' output channels; with a data or BN criterion, only for
    groups it did not score."""
    order = 2 if criterion == "l2" else 1
    for k, r in enumerate(plan.red):
        norms = K.weight_norms(plan.weight(r.node), out_channel_axis(r.node), order)
        roots = plan.red_roots[k][0]
        for c, v in zip(roots.tolist(), norms.tolist()):
            if c in sc.index and (criterion in ("l1", "l2") or not sc.has[sc.index[c][0]]):
                sc.out[sc.index[c][0]][sc.index[c][1]] += v


# ---- compensation -------------------------------------------------------------------
def compensate(plan: Plan, removed: set[int], mode: str, stats: Any) -> dict[str, int]:
    """Fold what the removed channels contributed into their consumers (refit or bias); the counts."""
    counts = {"bias_folds": 0, "refits": 0, "uncompensated": 0}
    for k, r in enumerate(plan.red):
        if r.in_ids is None:
            continue
        in_roots = plan.in_roots(k)
        rem = np.flatnonzero(np.isin(in_roots, list(removed)))
        if not len(rem):
            continue
        if r.node.op == "ConvTranspose" or mode == "none":
            counts["uncompensated"] += mode != "none"
            continue
        counts[_compensate_one(plan, r, in_roots, rem, mode, stats[r.consumed])] += 1
    return counts


def _compensate_one(plan: Plan, r: Any, in_roots: np.ndarray, rem: np.ndarray, mode: str, st: Any) -> str:
    """Compensate one consumer for its removed input channels `rem`; which way it went (a `counts` key)."""
    kept = np.setdiff1d(np.arange(len(in_roots)), rem)
    w = plan.consumer_matrix(r)
    if mode == "refit" and len(in_roots) <= REFIT_MAX_CHANNELS and len(kept):
        new_wk, delta = K.ridge_refit(w, st.covariance(), st.mean(), kept, rem, plan.o.ridge)
        if plan.bias_slot(r) is not None:
            plan.set_consumer_kept(r, kept, new_wk)
            plan.add_bias(r, delta)
            return "refits"
    if plan.add_bias(r, K.bias_fold(w, rem, st.mean()[rem])):
        return "bias_folds"
    plan.skipped.append({"node": r.node.name, "op": r.node.op, "reason": "no bias to compensate into"})
    return "uncompensated"
