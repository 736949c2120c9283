"""The state of one run of the prune pass: MAC tables, the consumers' weights as it edits them, bias
slots, and which layers a choice of channels touches.

The steps that read and change it are modules of their own: `selection` (candidate groups, scores,
compensation), `exact` (provably dead channels), `rewrite` (slicing the graph); `pruner` runs them.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.stats import model_stats
from onnxopt.framework.context import PassContext
from onnxopt.ir.graph import export_model, unique_name
from onnxopt.kernels import pruning as K
from onnxopt.passes.prune.channel_model import ChannelGroups, Reducer, const_value
from onnxopt.passes.prune.options import PruneOptions
from onnxopt.verify.accuracy_guard import nodes_by_output, trial_graph


class Plan:
    """Everything one run of the pass computes: MAC tables, scores, the removal set, folds, the rewrite."""

    def __init__(self, graph: gs.Graph, cg: ChannelGroups, ctx: PassContext, o: PruneOptions) -> None:
        self.graph, self.cg, self.ctx, self.o = graph, cg, ctx, o
        self.model = export_model(graph)
        self.input_shapes = ctx.settings.get("input_shapes")
        self.mac_shapes, shapes = self._shapes_for_macs()
        stats = model_stats(self.model, shapes)
        self.macs_before = stats.macs
        names = [n.name or f"{n.op}_{k}" for k, n in enumerate(graph.nodes)]
        by_node = {id(n): stats.macs_by_node.get(names[k], 0) for k, n in enumerate(graph.nodes)}
        self.red = cg.reducers
        self.node_macs = [float(by_node.get(id(r.node), 0)) for r in self.red]
        self.sizes = [(len(r.out_ids), len(r.in_ids) if r.in_ids is not None else 0) for r in self.red]
        self.red_roots = [(cg.roots(r.out_ids), cg.roots(r.in_ids) if r.in_ids is not None else None) for r in self.red]
        self.values: dict[tuple[int, int], np.ndarray] = {}
        #: keys of `values` whose array was modified (refit, bias folds) and must be written back.
        self.dirty: set[tuple[int, int]] = set()
        self.dirty_slots: list[tuple[gs.Node, int]] = []
        self.extra_sites: list[tuple[gs.Node, int, np.ndarray]] = []
        self.skipped: list[dict[str, str]] = []
        self.node_after = list(self.node_macs)

    def _shapes_for_macs(self) -> tuple[str, dict[str, tuple] | None]:
        """Where the MAC counts come from, and those input shapes: pinned input shapes, else the first
        calibration sample's (the shapes the model will see; guessed dynamic dimensions can count no MAC
        at all: on MiniLM a batch of 1 leaves the batch dimension symbolic and every MatMul counts 0),
        else the declared shapes with dynamic dimensions guessed (None)."""
        if self.input_shapes:
            return "input shapes", self.input_shapes
        if self.ctx.calibration is not None:
            first = next(iter(self.ctx.calibration))
            return "first calibration sample", {k: tuple(v.shape) for k, v in first.items()}
        return "declared (dynamic dimensions guessed)", self.input_shapes

    def in_roots(self, k: int) -> np.ndarray:
        """The channel classes reducer `k` sums over (one that consumes tracked channels: `in_ids` is set)."""
        roots = self.red_roots[k][1]
        assert roots is not None, f"reducer {k} sums over no tracked channel"
        return roots

    # ---- weights as consumer matrices [out, C, taps] ---------------------------------
    def weight(self, node: gs.Node, idx: int = 1) -> np.ndarray:
        """The (editable copy of the) constant input `idx` of `node`."""
        key = (id(node), idx)
        if key not in self.values:
            self.values[key] = np.array(const_value(node.inputs[idx]), copy=True)
        return self.values[key]

    def consumer_matrix(self, r: Reducer) -> np.ndarray:
        """The consumer's weight as [out, C, taps] in float64, C its input channels."""
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
        """Write a refit [out, kept, taps] back into the consumer's weight at input channels `kept`."""
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

    # ---- biases -------------------------------------------------------------------
    def bias_slot(self, r: Reducer, create: bool = True) -> tuple[gs.Node, int] | None:
        """(node, input index) of the consumer's bias, None if it has none and cannot get one.

        Conv and Gemm get a zero bias when `create` (otherwise the answer says only
        that one can be made); a MatMul's bias is a following Add of a constant.
        """
        if r.node.op in ("Conv", "Gemm"):
            return self._own_bias(r, create)
        if r.node.op == "MatMul":
            return self._add_bias(r)
        return None

    def _own_bias(self, r: Reducer, create: bool) -> tuple[gs.Node, int] | None:
        """A Conv's or Gemm's bias input, created as zeros when missing and `create`."""
        node, n_out = r.node, len(r.out_ids)
        if len(node.inputs) < 3 or not node.inputs[2].name:
            if not create:
                return node, 2
            self._zero_bias(r)
        bias = const_value(node.inputs[2])
        if bias is None or bias.size != n_out:
            return None
        return node, 2

    def _zero_bias(self, r: Reducer) -> None:
        """Give a Conv or Gemm without a bias a zero one (cut with its output channels)."""
        node = r.node
        weight = const_value(node.inputs[1])
        assert weight is not None  # the walk records only layers with a constant weight
        dtype = weight.dtype
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        zeros = gs.Constant(unique_name(self.graph, f"{node.name or node.op}_bias"), np.zeros(len(r.out_ids), dtype))
        if len(node.inputs) == 2:
            node.inputs.append(zeros)
        else:
            node.inputs[2] = zeros
        self.extra_sites.append((node, 2, r.out_ids))

    @staticmethod
    def _add_bias(r: Reducer) -> tuple[gs.Node, int] | None:
        """The constant operand of the Add that is a MatMul's only consumer, if it is per-column."""
        node, n_out = r.node, len(r.out_ids)
        users = node.outputs[0].outputs
        if len(users) == 1 and users[0].op == "Add":
            add = users[0]
            for k, t in enumerate(add.inputs):
                v = const_value(t)
                if t is not node.outputs[0] and v is not None and v.size == n_out:
                    return add, k
        return None

    def add_bias(self, r: Reducer, delta: np.ndarray) -> bool:
        """Add `delta` to the consumer's bias (creating one if it can); False if it has none."""
        slot = self.bias_slot(r)
        if slot is None:
            return False
        b = self.weight(*slot)
        key = (id(slot[0]), slot[1])
        self.dirty_slots.append(slot)
        self.values[key] = (b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype)
        self.dirty.add(key)
        return True

    # ---- what a choice touches --------------------------------------------------------
    def touches(self, groups: list[int]) -> list[bool]:
        """Per reducer: does it sum over (consume) a channel of one of `groups`?"""
        classes = np.array(sorted({c for gi in groups for c in self.cg.groups[gi].classes}), dtype=np.int64)
        return [r.in_ids is not None and bool(np.isin(self.in_roots(k), classes).any()) for k, r in enumerate(self.red)]

    def removal(self, groups: list[int], steps: list[tuple[int, list[int]]]) -> set[int]:
        """The channel classes removed by the given selection steps (group position, channel indices)."""
        return {self.cg.groups[groups[g]].classes[j] for g, chunk in steps for j in chunk}

    def memberships(self, groups: list[int]) -> list[list[list[tuple[int, int, int]]]]:
        """Per group, per channel: (reducer, side 0 out / 1 in, positions) of every layer carrying it."""
        index = {c: (gi, j) for gi in groups for j, c in enumerate(self.cg.groups[gi].classes)}
        pos = {gi: n for n, gi in enumerate(groups)}
        out: list[list[list[tuple[int, int, int]]]] = [[[] for _ in self.cg.groups[gi].classes] for gi in groups]
        for k, sides in enumerate(self.red_roots):
            for side, roots in enumerate(sides):
                if roots is None:
                    continue
                cs, counts = np.unique(roots, return_counts=True)
                for c, n in zip(cs.tolist(), counts.tolist()):
                    if c in index:
                        gi, j = index[c]
                        out[pos[gi]][j].append((k, side, n))
        return out

    def macs_after(self, removed: set[int]) -> float:
        """The model's MACs once `removed` is gone (and each layer's, into `node_after`)."""
        total = float(self.macs_before)
        for k, (o, i) in enumerate(self.sizes):
            out_roots, in_roots = self.red_roots[k]
            ko = int(np.sum(~np.isin(out_roots, list(removed))))
            ki = int(np.sum(~np.isin(in_roots, list(removed)))) if in_roots is not None else 0
            self.node_after[k] = self.node_macs[k] * K.mac_fraction([ko, ki], (o, i))
            total -= self.node_macs[k] - self.node_after[k]
        return total

    def fork(self) -> Plan:
        """This plan on a fresh copy of the graph (re-imported from `model`), for a guard trial."""
        graph = trial_graph(self.model)
        nodes = nodes_by_output(graph)
        cg = copy.copy(self.cg)
        cg.sites = [replace(s, node=nodes[s.node.outputs[0].name]) for s in self.cg.sites]
        cg.reducers = [replace(r, node=nodes[r.node.outputs[0].name]) for r in self.cg.reducers]
        plan = copy.copy(self)
        plan.graph, plan.cg, plan.red = graph, cg, cg.reducers
        plan.values, plan.dirty, plan.dirty_slots, plan.extra_sites, plan.skipped = {}, set(), [], [], []
        plan.node_after = list(self.node_macs)
        return plan


def unchanged_stats(plan: Plan, criterion: str) -> dict[str, Any]:
    """The report fields of a run that removes no channel."""
    return {
        "criterion": criterion,
        "removed_channels": 0,
        "macs_before": int(plan.macs_before),
        "macs_after": int(plan.macs_before),
        "mac_reduction": 0.0,
    }
