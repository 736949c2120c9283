"""Evaluating foldable nodes: a standalone model per batch run by onnxruntime, else node by node
(onnxruntime, then `onnx.reference`), and their used outputs turned into constants.

onnxruntime runs with graph optimizations off, so a folded value is exactly what
the graph says, not what a fused kernel would compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import model_opsets
from onnxopt.ir.graph_state import imported_from
from onnxopt.ir.gs_compat import LazyValues, export_node, export_tensor_proto
from onnxopt.passes.fold.selection import Skip
from onnxopt.runtime.sessions import make_session, session_options

#: Runs a model: runner(model, output names, feeds) -> output values.
Runner = Callable[[onnx.ModelProto, list[str], dict[str, np.ndarray]], list]


def evaluate_nodes(root: gs.Graph, nodes: list[gs.Node], skip: Skip) -> int:
    """Evaluate `nodes` (one batch, else one by one), turn their outputs read by other nodes into
    constants, and return how many nodes have no variable output left (folded)."""
    member = {id(n) for n in nodes}
    needed = [t for n in nodes for t in n.outputs if t.name and any(id(c) not in member for c in t.outputs)]
    if not needed:
        return 0
    values = _run_batch(root, nodes, needed)
    if values is None:
        values = _run_one_by_one(root, nodes, skip)
    for t in needed:
        if id(t) in values:
            _to_constant(t, values[id(t)])
    return sum(1 for n in nodes if not any(isinstance(t, gs.Variable) for t in n.outputs))


def _to_constant(t: gs.Tensor, v: np.ndarray) -> None:
    """Make the variable `t` the constant `v` (no longer produced by its node)."""
    if v.dtype.kind in "OSU":  # strings: gs writes numpy strings wrongly, the ONNX form is exact
        v = LazyValues(onnx.numpy_helper.from_array(v, t.name))
    t.to_constant(v)
    t.inputs.clear()


def _run_one_by_one(root: gs.Graph, nodes: list[gs.Node], skip: Skip) -> dict[int, np.ndarray]:
    """Values of the outputs of `nodes` evaluated in order, each from constants and earlier results;
    a node that cannot be evaluated is skipped (and so is what reads it)."""
    values: dict[int, np.ndarray] = {}
    for n in nodes:
        if any(t.name and isinstance(t, gs.Variable) and id(t) not in values for t in n.inputs):
            continue  # an input could not be evaluated
        got = _run_node(root, n, values)
        if got is None:
            skip(n, "onnxruntime and onnx.reference could not evaluate it")
            continue
        values.update(got)
    return values


def _standalone_model(
    root: gs.Graph, nodes: list[gs.Node], outputs: list[str], feeds: dict[str, np.ndarray] | None = None
) -> onnx.ModelProto:
    """A model computing `outputs` with `nodes`: constant inputs become initializers, `feeds` inputs.

    Built as protos from the gs nodes without touching them (a gs.Node wired to the
    real tensors would change their use-def lists).
    """
    feeds = feeds or {}
    protos = [export_node(n) for n in nodes]
    inits, seen = [], set(feeds)
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                inits.append(export_tensor_proto(t))
    graph = onnx.helper.make_graph(
        protos,
        "fold",
        [
            onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [onnx.ValueInfoProto(name=o) for o in outputs],
        inits,
    )
    opsets = model_opsets(root)
    source = imported_from(root)
    return onnx.helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=max(source.ir_version or 0, 7) if source is not None else 8,
    )


def _session_run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list:
    """Run with onnxruntime (optimizations off, to compute exactly what the graph says)."""
    sess = make_session(model, so=session_options(1, optimize=False))
    return sess.run(outputs, feeds)


def _reference_run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list:
    """Run with `onnx.reference` (for ops or types the onnxruntime build lacks)."""
    from onnx.reference import ReferenceEvaluator  # imported on first use: loading it takes about a second

    # run() returns a list when given output names (its stub also allows a dict)
    return cast(list, ReferenceEvaluator(model).run(outputs, feeds))


def _evaluated(
    build: Callable[[], onnx.ModelProto], outputs: list[str], feeds: dict[str, np.ndarray], runners: list[Runner]
) -> list[np.ndarray] | None:
    """The outputs of the model `build()` makes, from the first of `runners` that can run it; None when
    it cannot be built or no runner can run it, or an output is not a tensor."""
    try:
        model = build()
    except Exception:  # noqa: BLE001  gs's exporter raises whatever a tensor or attribute it cannot write raises
        return None
    for run in runners:
        try:
            results = run(model, outputs, feeds)
        except Exception:  # noqa: BLE001  onnxruntime and onnx.reference raise their own unrelated types per op
            continue
        return results if all(isinstance(r, np.ndarray) for r in results) else None
    return None


def _run_batch(root: gs.Graph, nodes: list[gs.Node], needed: list[gs.Tensor]) -> dict[int, np.ndarray] | None:
    """Values of `needed` from one onnxruntime run of all of `nodes` (None: the batch failed)."""
    names = [t.name for t in needed]
    results = _evaluated(lambda: _standalone_model(root, nodes, names), names, {}, [_session_run])
    return None if results is None else {id(t): r for t, r in zip(needed, results)}


def _run_node(root: gs.Graph, node: gs.Node, known: dict[int, np.ndarray]) -> dict[int, np.ndarray] | None:
    """Evaluate one node with onnxruntime, else `onnx.reference`; inputs from constants or `known`."""
    feeds = {t.name: known[id(t)] for t in node.inputs if t.name and id(t) in known}
    outputs = [t for t in node.outputs if t.name]
    names = [t.name for t in outputs]
    results = _evaluated(
        lambda: _standalone_model(root, [node], names, feeds), names, feeds, [_session_run, _reference_run]
    )
    return None if results is None else {id(t): np.asarray(r) for t, r in zip(outputs, results)}
