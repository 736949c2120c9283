"""Structured pruning: remove whole channels from the graph, with compensation instead of fine-tuning.

Uses the `channel_groups` analysis (onnxopt.channels) to know which tensors,
weights, biases, BN parameters, per-channel constants, Concat/Split/Slice
bounds, Reshape shapes and depthwise `group` attributes carry each channel,
picks channels under a MAC budget (kernels/pruning.py), folds what the removed
channels contributed into the consumers (their mean into the bias, or a ridge
least-squares refit of the consumers' weights on calibration activations), and
slices everything so the saved model is physically smaller.
Exact mode removes only channels that are provably constant (all-zero weights
and bias at every source), folding the constant into the consumers' bias, so
the outputs do not change.
"""
from __future__ import annotations

import copy
import fnmatch
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.accuracy_guard import AccuracyGuard, GuardOptions, split_samples
from onnxopt.calibration import observe, with_outputs
from onnxopt.channels import ChannelGroups, Reducer, const_value
from onnxopt.data import seeded_inputs
from onnxopt.report import count_reasons
from onnxopt.graph import export_model, import_model, unique_name
from onnxopt.kernels import pruning as K
from onnxopt.kernels.quant import all_finite
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.registry import register_pass
from onnxopt.runtime import make_session
from onnxopt.stats import model_stats

CRITERIA = ("auto", "l1", "l2", "bn", "activation", "recon")
COMPENSATIONS = ("auto", "none", "bias", "refit")
#: Consumer inputs wider than this get bias folding instead of a refit (a C x C solve each).
_REFIT_MAX_CHANNELS = 4096


@register_pass("prune")
class Prune(Pass):
    """Remove whole channels (structured pruning) under a MAC budget, compensating in the consumers."""

    tolerance = "approximate"

    @dataclass
    class Options(GuardOptions):
        """The guard's options (`min_cosine`, ...) come first; with the guard, the budget shrinks (the
        last-chosen channels stay)."""

        macs: float = option(0.3, "fraction of the model's MACs to remove (0 with exact=true: dead channels only)",
                             low=0, below=1)
        criterion: str = option("auto", "importance: l1, l2, bn, activation, recon (auto: recon with data, else l1)",
                                choices=CRITERIA)
        compensate: str = option("auto", "none, bias (fold the mean), refit (ridge least squares); auto: refit "
                                         "with data", choices=COMPENSATIONS)
        max_ratio: float = option(0.3, "at most this fraction of one group's channels is removed", low=0, below=1)
        round_to: int = option(8, "kept channel counts are multiples of this (ORT CPU kernels block channels by 8/16; "
                                   "1 = any)", low=1)
        protect: list[str] = option([], "name patterns (fnmatch) of nodes whose channels are never pruned")
        exact: bool = option(False, "only remove provably dead channels (outputs unchanged)")
        ridge: float = option(1e-3, "ridge strength of the refit, relative to the mean channel variance", low=0)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        cg: ChannelGroups = ctx.analysis("channel_groups", graph)
        plan = _Plan(graph, cg, ctx, o)
        return plan.execute()


def _out_axis(node: gs.Node) -> int:
    """Axis of a MAC node's weight that indexes its output channels."""
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}[node.op]


class _Plan:
    """Everything one run of the pass computes: MAC tables, scores, the removal set, folds, the rewrite."""

    def __init__(self, graph: gs.Graph, cg: ChannelGroups, ctx: PassContext, o: Prune.Options) -> None:
        self.graph, self.cg, self.ctx, self.o = graph, cg, ctx, o
        self.model = export_model(graph)
        self.input_shapes = ctx.settings.get("input_shapes")
        #: Where the MAC counts come from: pinned input shapes, else the first calibration sample's
        #: (the shapes the model will see; guessed dynamic dimensions can count no MAC at all: on
        #: MiniLM a batch of 1 leaves the batch dimension symbolic and every MatMul counts 0), else
        #: the declared shapes with dynamic dimensions guessed.
        self.mac_shapes, shapes = "input shapes", self.input_shapes
        if not shapes and ctx.calibration is not None:
            first = next(iter(ctx.calibration))
            self.mac_shapes, shapes = "first calibration sample", {k: tuple(v.shape) for k, v in first.items()}
        elif not shapes:
            self.mac_shapes = "declared (dynamic dimensions guessed)"
        stats = model_stats(self.model, shapes)
        self.macs_before = stats.macs
        names = [n.name or f"{n.op}_{k}" for k, n in enumerate(graph.nodes)]
        by_node = {id(n): stats.macs_by_node.get(names[k], 0) for k, n in enumerate(graph.nodes)}
        self.red = cg.reducers
        self.node_macs = [float(by_node.get(id(r.node), 0)) for r in self.red]
        self.sizes = [(len(r.out_ids), len(r.in_ids) if r.in_ids is not None else 0) for r in self.red]
        self.red_roots = [(cg.roots(r.out_ids), cg.roots(r.in_ids) if r.in_ids is not None else None)
                          for r in self.red]
        self.values: dict[tuple[int, int], np.ndarray] = {}
        #: keys of `values` whose array was modified (refit, bias folds) and must be written back.
        self.dirty: set[tuple[int, int]] = set()
        self.dirty_slots: list[tuple[gs.Node, int]] = []
        self.extra_sites: list[tuple[gs.Node, int, np.ndarray]] = []
        self.skipped: list[dict[str, str]] = []
        self.node_after = list(self.node_macs)

    # ---- which groups may be pruned -------------------------------------------
    def candidate_groups(self) -> list[int]:
        touching: dict[int, set[str]] = defaultdict(set)
        for r, (out_roots, _) in zip(self.red, self.red_roots):
            for c in set(out_roots.tolist()):
                touching[self.cg.class_group[c]].add(r.node.name)
        nonfinite = {n.name for n in self.graph.nodes
                     if any(isinstance(t, gs.Constant) and not all_finite(t.values) for t in n.inputs)}
        out = []
        for gi, g in enumerate(self.cg.groups):
            if not g.prunable:
                continue
            names = set(g.sources) | touching[gi]
            if any(fnmatch.fnmatch(n, p) for n in names for p in self.o.protect):
                continue
            if names & nonfinite:
                self.skipped.append({"node": g.name, "op": "channel group", "reason": "a weight of "
                                     f"{sorted(names & nonfinite)[0]} holds inf/NaN: its channels are kept"})
                continue
            out.append(gi)
        return out

    def finite_groups(self, groups: list[int], cstats: dict[str, K.ChannelStats] | None) -> list[int]:
        """`groups` less those whose consumers read inf/NaN on the calibration data (an inf/NaN upstream
        reaches them; no channel score or refit can be fit to it); those are listed in `skipped`."""
        bad = {t for t, st in (cstats or {}).items() if not st.cov.finite()}
        if not bad:
            return groups
        kept = []
        for gi in groups:
            if any(u and r.input_tensor in bad for r, u in zip(self.red, self.touches([gi]))):
                self.skipped.append({"node": self.cg.groups[gi].name, "op": "channel group", "reason":
                                     "its consumers read inf/NaN on the calibration data: its channels are kept"})
            else:
                kept.append(gi)
        return kept

    # ---- weights as consumer matrices [out, C, taps] ---------------------------------
    def weight(self, node: gs.Node, idx: int = 1) -> np.ndarray:
        key = (id(node), idx)
        if key not in self.values:
            self.values[key] = np.array(const_value(node.inputs[idx]), copy=True)
        return self.values[key]

    def consumer_matrix(self, r: Reducer) -> np.ndarray:
        w = self.weight(r.node).astype(np.float64)
        op = r.node.op
        if op == "Conv":
            return w.reshape(w.shape[0], w.shape[1], -1)
        if op == "ConvTranspose":
            return np.swapaxes(w, 0, 1).reshape(w.shape[1], w.shape[0], -1)
        if op == "Gemm" and int(r.node.attrs.get("transB", 0)):
            return w[:, :, None]
        return w.T[:, :, None]

    def set_consumer_kept(self, r: Reducer, kept: np.ndarray, new_wk: np.ndarray) -> None:
        w = self.weight(r.node)
        self.dirty.add((id(r.node), 1))
        self.dirty_slots.append((r.node, 1))
        op = r.node.op
        if op == "Conv":
            w[:, kept] = new_wk.reshape((w.shape[0], len(kept)) + w.shape[2:]).astype(w.dtype)
        elif op == "Gemm" and int(r.node.attrs.get("transB", 0)):
            w[:, kept] = new_wk[:, :, 0].astype(w.dtype)
        else:
            w[kept, :] = new_wk[:, :, 0].T.astype(w.dtype)

    def bias_slot(self, r: Reducer, create: bool = True) -> tuple[gs.Node, int] | None:
        """(node, input index) of the consumer's bias, None if it has none and cannot get one.

        Conv and Gemm get a zero bias when `create` (otherwise the answer says only
        that one can be made); a MatMul's bias is a following Add of a constant.
        """
        node, op = r.node, r.node.op
        n_out = len(r.out_ids)
        if op in ("Conv", "Gemm"):
            if len(node.inputs) < 3 or not node.inputs[2].name:
                if not create:
                    return node, 2
                dtype = const_value(node.inputs[1]).dtype
                while len(node.inputs) < 2:
                    node.inputs.append(gs.Variable.empty())
                zeros = gs.Constant(unique_name(self.graph, f"{node.name or op}_bias"), np.zeros(n_out, dtype))
                if len(node.inputs) == 2:
                    node.inputs.append(zeros)
                else:
                    node.inputs[2] = zeros
                self.extra_sites.append((node, 2, r.out_ids))
            bias = const_value(node.inputs[2])
            if bias is None or bias.size != n_out:
                return None
            return node, 2
        if op == "MatMul":
            users = node.outputs[0].outputs
            if len(users) == 1 and users[0].op == "Add":
                add = users[0]
                for k, t in enumerate(add.inputs):
                    v = const_value(t)
                    if t is not node.outputs[0] and v is not None and v.size == n_out:
                        return add, k
        return None

    def add_bias(self, r: Reducer, delta: np.ndarray) -> bool:
        slot = self.bias_slot(r)
        if slot is None:
            return False
        b = self.weight(*slot)
        key = (id(slot[0]), slot[1])
        self.dirty_slots.append(slot)
        self.values[key] = (b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype)
        self.dirty.add(key)
        return True

    # ---- exact mode -------------------------------------------------------------
    def dead_classes(self, groups: list[int]) -> tuple[set[int], dict[str, Any]]:
        """Classes whose every source channel is all-zero, with the bias folds that make removal exact."""
        allowed = {c for gi in groups for c in self.cg.groups[gi].classes}
        alive: set[int] = set()
        for r, (out_roots, _) in zip(self.red, self.red_roots):
            norms = K.weight_norms(self.weight(r.node), _out_axis(r.node))
            if len(r.node.inputs) > 2 and r.node.inputs[2].name and r.node.op != "MatMul":
                b = np.abs(const_value(r.node.inputs[2]).astype(np.float64)).reshape(-1)
                norms = norms + (b if b.size == len(norms) else float(b.sum()))
            alive.update(out_roots[norms != 0].tolist())
        dead = allowed - alive
        if not dead:
            return set(), {}
        consumers = [(k, r) for k, r in enumerate(self.red) if r.in_ids is not None
                     and dead.intersection(self.red_roots[k][1].tolist())]
        tensors = sorted({r.input_tensor for _, r in consumers})
        sess = make_session(with_outputs(self.model, tensors), optimize=False)
        runs = [dict(zip(tensors, sess.run(tensors, feeds)))
                for feeds in seeded_inputs(self.model, 2, seed=0, input_shapes=self.input_shapes)]
        folds: dict[int, np.ndarray] = {}
        for k, r in consumers:
            axis = self.cg.tensors[r.input_tensor][0]
            in_roots = self.red_roots[k][1]
            pos = np.flatnonzero(np.isin(in_roots, list(dead)))
            vals = []
            for run in runs:
                x = np.moveaxis(run[r.input_tensor], axis, -1).reshape(-1, len(in_roots))[:, pos]
                vals.append(x)
            x = np.concatenate(vals)
            const = np.all(x == x[:1], axis=0)
            v = x[0].astype(np.float64)
            bad = ~const
            if np.any(v != 0):
                pads = r.node.attrs.get("pads", [0]) if r.node.op == "Conv" else [0]
                foldable = r.node.op in ("Gemm", "MatMul") or (
                    r.node.op == "Conv" and not any(pads) and r.node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
                if not foldable or self.bias_slot(r, create=False) is None:
                    bad |= v != 0
            for c in in_roots[pos[bad]].tolist():
                dead.discard(c)
            folds[k] = (pos, v)
        deltas = {}
        for k, (pos, v) in folds.items():
            in_roots = self.red_roots[k][1]
            keep = np.isin(in_roots[pos], list(dead))
            if np.any(v[keep] != 0):
                deltas[k] = K.bias_fold(self.consumer_matrix(self.red[k]), pos[keep], v[keep])
        for k, delta in deltas.items():
            self.add_bias(self.red[k], delta)
        return dead, {"dead_channels": len(dead), "bias_folds": len(deltas)}

    # ---- approximate mode ----------------------------------------------------------
    def touches(self, groups: list[int]) -> list[bool]:
        """Per reducer: does it sum over (consume) a channel of one of `groups`?"""
        classes = np.array(sorted({c for gi in groups for c in self.cg.groups[gi].classes}), dtype=np.int64)
        return [r.in_ids is not None and bool(np.isin(self.red_roots[k][1], classes).any())
                for k, r in enumerate(self.red)]

    def calibration_stats(self, calib: Any, groups: list[int]) -> dict[str, K.ChannelStats] | None:
        """Channel statistics of the inputs of the consumers of candidate channels (the only ones read)."""
        if calib is None:
            return None
        used = self.touches(groups)
        tensors = sorted({r.input_tensor for r, u in zip(self.red, used) if u})
        dims = {t: (self.cg.tensors[t][0], len(self.cg.tensors[t][1])) for t in tensors}
        return observe(self.model, calib, tensors, lambda t: K.ChannelStats(*dims[t]), desc="prune: calibrating",
                       total=len(calib))

    def scores(self, groups: list[int], criterion: str, stats, compensate: str) -> list[np.ndarray]:
        index = {c: (gi, j) for gi in groups for j, c in enumerate(self.cg.groups[gi].classes)}
        out = {gi: np.zeros(len(self.cg.groups[gi].classes)) for gi in groups}
        has = {gi: False for gi in groups}

        def add(roots: np.ndarray, vals: np.ndarray) -> None:
            for c, v in zip(roots.tolist(), vals.tolist()):
                if c in index:
                    gi, j = index[c]
                    out[gi][j] += v
                    has[gi] = True

        if criterion == "bn":
            for s in self.cg.sites:
                if s.kind == "const" and s.node.op == "BatchNormalization" and s.index == 1:
                    gamma = const_value(s.node.inputs[1]).astype(np.float64)
                    var = const_value(s.node.inputs[4]).astype(np.float64)
                    add(self.cg.roots(s.ids), np.abs(gamma) / np.sqrt(var + float(s.node.attrs.get("epsilon", 1e-5))))
        elif criterion in ("activation", "recon"):
            cond_cache: dict[str, np.ndarray] = {}
            used = self.touches(groups)
            for k, r in enumerate(self.red):
                if not used[k]:  # sums over no candidate channel: its statistics score nothing
                    continue
                st = stats[r.input_tensor]
                if criterion == "activation":
                    if r.input_tensor not in cond_cache:
                        cond_cache[r.input_tensor] = st.mean_abs()
                        add(self.red_roots[k][1], st.mean_abs())
                    continue
                if r.input_tensor not in cond_cache:
                    cov = st.covariance()
                    if compensate == "refit" and len(cov) <= _REFIT_MAX_CHANNELS:
                        var = K.conditional_variance(cov, self.o.ridge)
                    elif compensate == "bias":
                        var = np.diag(cov)
                    else:
                        var = np.diag(cov) + st.mean() ** 2
                    cond_cache[r.input_tensor] = np.maximum(var, 0.0)
                add(self.red_roots[k][1], K.removal_error(self.consumer_matrix(r), cond_cache[r.input_tensor]))
        if criterion in ("l1", "l2") or not all(has.values()):
            order = 2 if criterion == "l2" else 1
            for k, r in enumerate(self.red):
                norms = K.weight_norms(self.weight(r.node), _out_axis(r.node), order)
                roots = self.red_roots[k][0]
                for c, v in zip(roots.tolist(), norms.tolist()):
                    if c in index and (criterion in ("l1", "l2") or not has[index[c][0]]):
                        out[index[c][0]][index[c][1]] += v
        return [out[gi] for gi in groups]

    def compensate(self, removed: set[int], mode: str, stats) -> dict[str, int]:
        counts = {"bias_folds": 0, "refits": 0, "uncompensated": 0}
        for k, r in enumerate(self.red):
            if r.in_ids is None:
                continue
            in_roots = self.red_roots[k][1]
            rem = np.flatnonzero(np.isin(in_roots, list(removed)))
            if not len(rem):
                continue
            if r.node.op == "ConvTranspose" or mode == "none":
                counts["uncompensated"] += mode != "none"
                continue
            st = stats[r.input_tensor]
            kept = np.setdiff1d(np.arange(len(in_roots)), rem)
            w = self.consumer_matrix(r)
            if mode == "refit" and len(in_roots) <= _REFIT_MAX_CHANNELS and len(kept):
                new_wk, delta = K.ridge_refit(w, st.covariance(), st.mean(), kept, rem, self.o.ridge)
                if self.bias_slot(r) is not None:
                    self.set_consumer_kept(r, kept, new_wk)
                    self.add_bias(r, delta)
                    counts["refits"] += 1
                    continue
            if self.add_bias(r, K.bias_fold(w, rem, st.mean()[rem])):
                counts["bias_folds"] += 1
            else:
                counts["uncompensated"] += 1
                self.skipped.append({"node": r.node.name, "op": r.node.op, "reason": "no bias to compensate into"})
        return counts

    # ---- the rewrite ------------------------------------------------------------------
    def apply(self, removed: set[int]) -> None:
        cg, g = self.cg, self.graph
        by_input: dict[tuple[int, int], list] = defaultdict(list)
        nodes: dict[int, gs.Node] = {}
        for s in cg.sites:
            if s.kind == "const":
                by_input[(id(s.node), s.index)].append((s.axis, s.ids))
                nodes[id(s.node)] = s.node
        for node, idx, ids in self.extra_sites:
            by_input[(id(node), idx)].append((0, ids))
            nodes[id(node)] = node
        for node, idx in self.dirty_slots:
            nodes[id(node)] = node
        for key in set(by_input) | self.dirty:
            node = nodes[key[0]]
            idx = key[1]
            orig = const_value(node.inputs[idx])
            changed = key in self.dirty
            arr = self.values[key] if changed else orig
            for axis, ids in by_input.get(key, []):
                mask = cg.keep_mask(ids, removed)
                if not mask.all():
                    arr = np.compress(mask, arr, axis=axis)
                    changed = True
            if changed:
                base = node.inputs[idx].name or "w"
                node.inputs[idx] = gs.Constant(unique_name(g, f"{base}_pruned"),
                                               np.ascontiguousarray(arr.astype(orig.dtype)))
        for s in cg.sites:
            mask = cg.keep_mask(s.ids, removed)
            if s.kind == "const" or mask.all():
                continue
            kept = int(mask.sum())
            if s.kind == "group":
                s.node.attrs["group"] = kept
            elif s.kind == "split":
                bounds = s.extra
                sizes = [int(mask[bounds[i]:bounds[i + 1]].sum()) for i in range(len(bounds) - 1)]
                if g.opset < 13:
                    s.node.attrs["split"] = sizes
                else:
                    split = gs.Constant(unique_name(g, "split_pruned"), np.array(sizes, np.int64))
                    s.node.attrs.pop("num_outputs", None)
                    if len(s.node.inputs) > 1:
                        s.node.inputs[1] = split
                    else:
                        s.node.inputs.append(split)
            elif s.kind == "slice":
                start, end = s.extra
                j = s.index
                new_start = int(mask[:start].sum())
                new_end = new_start + int(mask[start:end].sum())
                for inp, val in ((1, new_start), (2, new_end)):
                    v = np.array(const_value(s.node.inputs[inp]), copy=True)
                    v[j] = val
                    s.node.inputs[inp] = gs.Constant(unique_name(g, "slice_pruned"), v)
            elif s.kind in ("reshape", "reshape_piece"):
                idx = 1 if s.kind == "reshape" else s.index
                v = np.array(const_value(s.node.inputs[idx]), copy=True)
                flat = v.reshape(-1)
                flat[s.axis] = kept
                s.node.inputs[idx] = gs.Constant(unique_name(g, "shape_pruned"), v)
        io = {t.name for t in g.inputs} | {t.name for t in g.outputs}
        tensors = g.tensors()
        for name in cg.tensors:
            t = tensors.get(name)
            if isinstance(t, gs.Variable) and name not in io:
                t.shape = None

    def macs_after(self, removed: set[int]) -> float:
        total = float(self.macs_before)
        for k, (o, i) in enumerate(self.sizes):
            out_roots, in_roots = self.red_roots[k]
            ko = int(np.sum(~np.isin(out_roots, list(removed))))
            ki = int(np.sum(~np.isin(in_roots, list(removed)))) if in_roots is not None else 0
            self.node_after[k] = self.node_macs[k] * K.mac_fraction([ko, ki], (o, i))
            total -= self.node_macs[k] - self.node_after[k]
        return total

    def execute(self) -> PassResult:
        o, cg = self.o, self.cg
        groups = self.candidate_groups()
        skipped = [{"node": g.name, "op": "channel group", "reason": "; ".join(g.barriers)}
                   for g in cg.groups if g.barriers]
        stats: dict[str, Any] = {"groups": len(cg.groups), "candidate_groups": len(groups),
                                 "barrier_groups": sum(bool(g.barriers) for g in cg.groups)}
        scores: list[np.ndarray] = []
        if o.exact:
            removed, extra = self.dead_classes(groups)
            stats.update(extra)
            criterion = "dead"
        else:
            calib = self.ctx.calibration
            criterion = o.criterion if o.criterion != "auto" else ("recon" if calib is not None else "l1")
            mode = o.compensate if o.compensate != "auto" else ("refit" if calib is not None else "none")
            if criterion in ("activation", "recon") or mode != "none":
                self.ctx.require_calibration("prune")
            stats.update(compensation=mode, macs_requested=o.macs, macs_counted_at=self.mac_shapes)
            budget = sum(m for m, u in zip(self.node_macs, self.touches(groups)) if u) if groups else 0.0
            if not groups or not budget or o.macs <= 0:
                # decided before any calibration run or covariance: nothing here can be budgeted
                why = (None if not groups else
                       "the budget removes nothing (macs=0)" if o.macs <= 0 else
                       f"the layers reading the {len(groups)} prunable groups count 0 MACs at the "
                       f"{self.mac_shapes} input shapes (shapes unknown: give --input-shape or --calib)")
                stats.update(criterion=criterion, removed_channels=0, macs_before=int(self.macs_before),
                             macs_after=int(self.macs_before), mac_reduction=0.0)
                return PassResult(False, stats, skipped + self.skipped, self.report(groups, [], set()),
                                  reason=why or self.noop_reason(groups, skipped))
            split = split_samples(calib, o.holdout, o.guard_samples, self.model) if calib is not None else None
            cstats = self.calibration_stats(split.fit, groups) if split is not None else None
            groups = self.finite_groups(groups, cstats)
            scores = self.scores(groups, criterion, cstats, mode)
            steps = K.select_channel_steps(scores, self.node_macs, self.memberships(groups), self.sizes, o.macs,
                                           o.max_ratio, max(o.round_to, 1))
            removed = self.removal(groups, steps)
            if removed and o.min_cosine > 0 and split is not None:
                removed, why = self.guard(groups, steps, mode, cstats, split.guard, split.held_out, stats)
                if not removed:
                    stats.update(criterion=criterion, removed_channels=0, macs_before=int(self.macs_before),
                                 macs_after=int(self.macs_before), mac_reduction=0.0)
                    return PassResult(False, stats, skipped + self.skipped, self.report(groups, scores, set()),
                                      reason=why)
                if mode != "none" and split.held_out:
                    # the channels are chosen; compensate with statistics of every sample, held-out ones included
                    for name, st in self.calibration_stats(split.held, groups).items():
                        cstats[name].merge(st)
            elif removed:
                stats["guard"] = ("off (min_cosine=0)" if o.min_cosine <= 0 else
                                  "not measured: no calibration data (give --calib to bound the output error)")
            if removed and mode != "none":
                stats.update(self.compensate(removed, mode, cstats))
        stats["criterion"] = criterion
        after = self.macs_after(removed)
        details = self.report(groups, scores, removed)
        stats.update({"removed_channels": len(removed), "macs_before": int(self.macs_before),
                      "macs_after": int(round(after)),
                      "mac_reduction": round(1 - after / self.macs_before, 4) if self.macs_before else 0.0})
        if str(stats.get("guard", "")).startswith("backed off"):
            stats["guard"] += f"; MACs reduced by {stats['mac_reduction']:.3f} (asked {o.macs})"
        if removed:
            self.apply(removed)
        return PassResult(changed=bool(removed), stats=stats, skipped=skipped + self.skipped, details=details,
                          reason="" if removed else self.noop_reason(groups, skipped))

    def removal(self, groups: list[int], steps: list[tuple[int, list[int]]]) -> set[int]:
        """The channel classes removed by the given selection steps (group position, channel indices)."""
        return {self.cg.groups[groups[g]].classes[j] for g, chunk in steps for j in chunk}

    def guard(self, groups: list[int], steps: list[tuple[int, list[int]]], mode: str, cstats: Any,
              samples: list, held_out: bool, stats: dict[str, Any]) -> tuple[set[int], str]:
        """The longest prefix of the selection steps whose pruned (and compensated) model meets `min_cosine`.

        Each trial prunes a fresh copy of the graph as the final rewrite will, compensated with the
        statistics of the fitting samples and measured on the held-out ones (the final compensation
        then uses every sample). Returns the classes to remove and, when none, why.
        """
        o = self.o
        guard = AccuracyGuard(self.model, samples, o.min_cosine)

        def build(k: int) -> onnx.ModelProto:
            trial = self.fork()
            removed = trial.removal(groups, steps[:k])
            if mode != "none":
                trial.compensate(removed, mode, cstats)
            trial.apply(removed)
            return export_model(trial.graph)

        out = guard.search(len(steps), build)
        stats.update(out.stats(len(steps), o.min_cosine, held_out, len(samples)))
        where = f"{len(samples)} {'held-out' if held_out else 'calibration (not held-out)'} samples"
        if out.kept == len(steps):
            stats["guard"] = f"met: output cosine {out.cosine:.4f} >= {o.min_cosine} on {where}"
        elif out.kept:
            stats["guard"] = (f"backed off: {out.kept} of {len(steps)} selection steps kept, output cosine "
                              f"{out.cosine:.4f} >= {o.min_cosine} on {where} (full budget: "
                              f"{out.trials[0].cosine:.4f})")
        else:
            least = min(out.trials, key=lambda t: t.kept)
            stats["guard"] = (f"the accuracy guard measured output cosine {least.cosine:.4f} < min_cosine="
                              f"{o.min_cosine} on {where} with only the first {least.kept} of {len(steps)} "
                              f"selection steps; the model is left unchanged")
            return set(), stats["guard"]
        return self.removal(groups, steps[:out.kept]), ""

    def fork(self) -> "_Plan":
        """This plan on a fresh copy of the graph (re-imported from `model`), for a guard trial."""
        graph = import_model(self.model)
        graph._onnxopt_names = None  # as the pass manager does: names are collected on first use
        nodes = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
        cg = copy.copy(self.cg)
        cg.sites = [replace(s, node=nodes[s.node.outputs[0].name]) for s in self.cg.sites]
        cg.reducers = [replace(r, node=nodes[r.node.outputs[0].name]) for r in self.cg.reducers]
        plan = copy.copy(self)
        plan.graph, plan.cg, plan.red = graph, cg, cg.reducers
        plan.values, plan.dirty, plan.dirty_slots, plan.extra_sites, plan.skipped = {}, set(), [], [], []
        plan.node_after = list(self.node_macs)
        return plan

    def noop_reason(self, groups: list[int], skipped: list[dict[str, str]]) -> str:
        """Why no channel was removed, for the report."""
        if not self.cg.groups:
            return "no channel group: the model has no prunable Conv/Gemm/MatMul layer"
        if not groups:
            why = count_reasons(skipped + self.skipped, limit=2)
            return (f"none of the {len(self.cg.groups)} channel groups can be pruned"
                    + (f" ({why})" if why else " (protected or not prunable)"))
        if self.o.exact:
            return f"no provably dead channel in {len(groups)} prunable groups"
        return (f"no channel chosen in {len(groups)} prunable groups under macs={self.o.macs}, "
                f"max_ratio={self.o.max_ratio}, round_to={self.o.round_to}")

    def memberships(self, groups: list[int]) -> list[list[list[tuple[int, int, int]]]]:
        index = {c: (gi, j) for gi in groups for j, c in enumerate(self.cg.groups[gi].classes)}
        pos = {gi: n for n, gi in enumerate(groups)}
        out = [[[] for _ in self.cg.groups[gi].classes] for gi in groups]
        for k, (out_roots, in_roots) in enumerate(self.red_roots):
            for side, roots in ((0, out_roots), (1, in_roots)):
                if roots is None:
                    continue
                cs, counts = np.unique(roots, return_counts=True)
                for c, n in zip(cs.tolist(), counts.tolist()):
                    if c in index:
                        gi, j = index[c]
                        out[pos[gi]][j].append((k, side, n))
        return out

    def report(self, groups: list[int], scores: list[np.ndarray], removed: set[int]) -> list[dict[str, Any]]:
        rows = []
        sc = dict(zip(groups, scores))
        for gi, g in enumerate(self.cg.groups):
            n = len(g.classes)
            gone = [j for j, c in enumerate(g.classes) if c in removed]
            touched = [k for k, (out_roots, in_roots) in enumerate(self.red_roots)
                       if self.cg.class_group.get(int(out_roots[0])) == gi or
                       (in_roots is not None and len(in_roots) and
                        any(self.cg.class_group.get(int(c)) == gi for c in np.unique(in_roots)))]
            row: dict[str, Any] = {"group": g.name, "sources": len(g.sources), "channels_before": n,
                                   "channels_after": n - len(gone),
                                   "macs_before": int(sum(self.node_macs[k] for k in touched)),
                                   "macs_after": int(round(sum(self.node_after[k] for k in touched)))}
            if gi in sc and len(sc[gi]):
                s = sc[gi]
                row["score_removed"] = float(s[gone].sum()) if gone else 0.0
                row["predicted_error"] = float(s[gone].sum() / max(s.sum(), 1e-30)) if gone else 0.0
            if g.barriers:
                row["barriers"] = g.barriers
            rows.append(row)
        return rows
