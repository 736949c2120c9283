"""Shape arithmetic folded from inferred static dimensions: shape values fully known become constants,
and a Reshape target with dynamic entries becomes a constant where they can be said as 0 (copy the
input's dim) or one -1 (inferred from the element count). Dynamic axes are never frozen.

The abstract values come from `shape_values`; shape facts from inference over the
main graph (`info`), which bodies read too: a body using the shape of an outer
tensor the main graph knows folds like the main graph, its own tensors stay unknown.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.ir.graph import iter_graphs, output_owners, unique_name
from onnxopt.passes.fold.shape_values import ShapeValue
from onnxopt.passes.fold.shape_values import evaluate as evaluate_shape_values


def fold_shapes(graph: gs.Graph, counts: dict, info: dict[str, TensorInfo]) -> int:
    """Replace fully known shape values by constants; give Reshape a -1 for its one dynamic entry.

    `info`: tensor shapes inferred on the graph as it is now; the graph's nodes must be in
    topological order. Partial Reshape targets are rewritten in the main graph, from the main
    graph's own values (bodies are evaluated after it and must not stand in for them)."""
    owners = output_owners(graph)
    n = 0
    main_values: dict[int, ShapeValue] = {}
    for g in iter_graphs(graph):
        values = evaluate_shape_values(g.nodes, info)
        if g is graph:
            main_values = values
        n += _fold_known_values(g, values, info, owners, counts)
    return n + _fold_reshape_targets(graph, main_values, info, counts)


def _known_value(node: gs.Node, values: dict[int, ShapeValue], owners: dict[int, gs.Graph]) -> ShapeValue | None:
    """The fully known value of `node`'s single output, if it may become a constant."""
    if not node.outputs or id(node.outputs[0]) in owners:
        return None
    out = node.outputs[0]
    v = values.get(id(out))
    if v is None or not v.known or node.op == "Constant" or not isinstance(out, gs.Variable) or len(node.outputs) != 1:
        return None
    return v


def _fold_known_values(
    g: gs.Graph, values: dict[int, ShapeValue], info: dict[str, TensorInfo], owners: dict[int, gs.Graph], counts: dict
) -> int:
    """Turn the outputs of nodes of `g` whose shape value is fully known into constants; how many."""
    n = 0
    for node in list(g.nodes):
        v = _known_value(node, values, owners)
        if v is None:
            continue
        out = node.outputs[0]
        declared = info.get(out.name)
        if declared is not None and declared.dtype is not None and np.dtype(declared.dtype) != v.dtype:
            continue  # inference and the abstract value disagree on the type: leave it to the runtime
        out.to_constant(v.array())
        out.inputs.clear()
        n += 1
        counts["shape_folded"] += 1
    return n


def _fold_reshape_targets(
    graph: gs.Graph, values: dict[int, ShapeValue], info: dict[str, TensorInfo], counts: dict
) -> int:
    """Give Reshapes of the main graph whose computed target is partly known a constant target."""
    n = 0
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant):
            continue
        v = values.get(id(node.inputs[1]))
        if v is None or v.scalar:
            continue
        target = reshape_target(v.items, info.get(node.inputs[0].name), node.attrs.get("allowzero", 0))
        if target is not None:
            node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name or 'reshape'}_shape"), target)
            n += 1
            counts["reshape_partial"] += 1
    return n


def reshape_target(items: tuple, data_info: TensorInfo | None, allowzero: int) -> np.ndarray | None:
    """A constant Reshape target equivalent to partly known `items`, or None.

    An unknown entry equal to the data's own dimension at that index (same
    symbol) becomes 0 ("copy", when allowzero is off); one remaining unknown
    becomes -1 (inferred from the element count). Dynamic sizes stay dynamic.
    """
    if sum(not isinstance(d, int) for d in items) == 1 and -1 not in items:
        return np.array([d if isinstance(d, int) else -1 for d in items], dtype=np.int64)
    dims = data_info.shape if data_info is not None and data_info.shape is not None else ()
    out = [_copied_dim(i, d, dims, allowzero) for i, d in enumerate(items)]
    unknown = [i for i, d in enumerate(out) if d is None]
    if len(unknown) > 1 or (unknown and -1 in out):
        return None
    return np.array([-1 if d is None else d for d in out], dtype=np.int64)


def _copied_dim(i: int, d: object, dims: tuple, allowzero: int) -> int | None:
    """Entry `i` of a Reshape target: a known size, 0 for an unknown one that is the data's own dim
    `i` (same symbol; allowzero off), else None (unknown)."""
    if isinstance(d, int):
        return d
    if not allowzero and i < len(dims) and isinstance(dims[i], str) and getattr(d, "label", None) == dims[i]:
        return 0
    return None
