"""Exact mode of the prune pass: the channels that are provably dead (all-zero weights and bias at
every source), and the bias folds that make removing them leave the outputs unchanged.

A dead channel still carries a value downstream when a per-channel op adds a constant (a BN shift,
a bias Add): two seeded runs find the channels whose consumers read a constant, and that constant is
folded into the consumer's bias; a channel whose value varies, or whose constant cannot be folded,
stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxopt.data.observe import with_outputs
from onnxopt.data.samples import seeded_inputs
from onnxopt.ir.ops import out_channel_axis
from onnxopt.kernels import pruning as K
from onnxopt.passes.prune.channel_model import Reducer, const_value
from onnxopt.passes.prune.plan import Plan
from onnxopt.runtime.sessions import make_session


def dead_classes(plan: Plan, groups: list[int]) -> tuple[set[int], dict[str, Any]]:
    """Classes whose every source channel is all-zero, with the bias folds that make removal exact."""
    allowed = {c for gi in groups for c in plan.cg.groups[gi].classes}
    dead = allowed - _alive_classes(plan)
    if not dead:
        return set(), {}
    consumers = [
        (k, r) for k, r in enumerate(plan.red) if r.in_ids is not None and dead.intersection(plan.in_roots(k).tolist())
    ]
    runs = _seeded_runs(plan, sorted({r.consumed for _, r in consumers}))
    folds = {k: _constant_inputs(plan, k, r, runs, dead) for k, r in consumers}
    deltas = {}
    for k, (pos, v) in folds.items():
        in_roots = plan.in_roots(k)
        keep = np.isin(in_roots[pos], list(dead))
        if np.any(v[keep] != 0):
            deltas[k] = K.bias_fold(plan.consumer_matrix(plan.red[k]), pos[keep], v[keep])
    for k, delta in deltas.items():
        plan.add_bias(plan.red[k], delta)
    return dead, {"dead_channels": len(dead), "bias_folds": len(deltas)}


def _alive_classes(plan: Plan) -> set[int]:
    """Classes some source of which has a non-zero weight or bias for them."""
    alive: set[int] = set()
    for r, (out_roots, _) in zip(plan.red, plan.red_roots):
        norms = K.weight_norms(plan.weight(r.node), out_channel_axis(r.node))
        if len(r.node.inputs) > 2 and r.node.inputs[2].name and r.node.op != "MatMul":
            bias = const_value(r.node.inputs[2])
            assert bias is not None  # the walk records a layer's bias as a constant site
            b = np.abs(bias.astype(np.float64)).reshape(-1)
            norms = norms + (b if b.size == len(norms) else float(b.sum()))
        alive.update(out_roots[norms != 0].tolist())
    return alive


def _seeded_runs(plan: Plan, tensors: list[str]) -> list[dict[str, np.ndarray]]:
    """The values of `tensors` on two seeded inputs."""
    sess = make_session(with_outputs(plan.model, tensors), optimize=False)
    return [
        dict(zip(tensors, sess.run(tensors, feeds)))
        for feeds in seeded_inputs(plan.model, 2, seed=0, input_shapes=plan.input_shapes)
    ]


def _constant_inputs(
    plan: Plan, k: int, r: Reducer, runs: list[dict[str, np.ndarray]], dead: set[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(positions of dead channels in consumer k's input, their value in the first run); drops from
    `dead` the channels whose value varies, or is non-zero where it cannot be folded into a bias."""
    axis = plan.cg.tensors[r.consumed][0]
    in_roots = plan.in_roots(k)
    pos = np.flatnonzero(np.isin(in_roots, list(dead)))
    x = np.concatenate([np.moveaxis(run[r.consumed], axis, -1).reshape(-1, len(in_roots))[:, pos] for run in runs])
    const = np.all(x == x[:1], axis=0)
    v = x[0].astype(np.float64)
    bad = ~const
    if np.any(v != 0) and not (_foldable(r) and plan.bias_slot(r, create=False) is not None):
        bad |= v != 0
    for c in in_roots[pos[bad]].tolist():
        dead.discard(c)
    return pos, v


def _foldable(r: Reducer) -> bool:
    """A constant input folds exactly into the bias of a Gemm, a MatMul, or an unpadded Conv."""
    node = r.node
    pads = node.attrs.get("pads", [0]) if node.op == "Conv" else [0]
    return node.op in ("Gemm", "MatMul") or (
        node.op == "Conv" and not any(pads) and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    )
