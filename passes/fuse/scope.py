"""The graph a fusion works in and the checks every rewrite shares: which node alone reads a tensor,
which constant a Mul/Add applies, and how a fused node takes the place of the one it absorbed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.ir.graph import constant_value, detach, is_constant, output_owners, replace_all_uses
from onnxopt.ir.graph_state import pinned_output_owners


@dataclass
class Scope:
    """One graph being fused: `root` (names, outputs of every graph), `graph` (where nodes are added),
    the ids of the nodes that belong to it, the inferred shapes, and the skipped list."""

    root: gs.Graph
    graph: gs.Graph
    local: set[int]
    shapes: dict[str, TensorInfo]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    def owns(self, node: gs.Node | None) -> bool:
        """Whether `node` belongs to this graph (rewrites never cross a body boundary)."""
        return node is not None and id(node) in self.local

    def add(self, node: gs.Node) -> None:
        """Append a new node to this graph."""
        self.graph.nodes.append(node)
        self.local.add(id(node))

    def skip(self, node: gs.Node, reason: str) -> None:
        """List `node` as left alone, with why, in the pass's report."""
        self.skipped[node.name] = {"node": node.name, "op": node.op, "reason": reason}

    def rank(self, t: gs.Tensor) -> int | None:
        """Rank of `t`: inferred (main graph), else as declared in the model (bodies), else None."""
        info = self.shapes.get(t.name)
        if info is not None and info.shape is not None:
            return len(info.shape)
        return len(t.shape) if t.shape is not None else None


def sole_consumer(sc: Scope, t: gs.Tensor) -> gs.Node | None:
    """The only consumer of `t`, if it has exactly one, in this graph, and `t` is no output of any graph."""
    owners = pinned_output_owners(sc.root)
    if owners is None:
        owners = output_owners(sc.root)
    if len(t.outputs) != 1 or id(t) in owners or not sc.owns(t.outputs[0]):
        return None
    return t.outputs[0]


def bypass(sc: Scope, node: gs.Node, replacement: gs.Tensor) -> None:
    """Remove `node` (single output) and make its consumers read `replacement`."""
    out = node.outputs[0]
    prod = replacement.inputs[0] if replacement.inputs else None
    if prod is not None and len(replacement.outputs) == 1 and replacement.outputs[0] is node:
        detach(node)  # the fused op now produces the old output tensor itself: names stay
        k = next(i for i, t in enumerate(prod.outputs) if t is replacement)
        prod.outputs[k] = out
        return
    replace_all_uses(sc.root, out, replacement, pinned_output_owners(sc.root))
    detach(node)


def const_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(dynamic operand, constant value) of a binary Mul/Add with one constant float input."""
    if len(node.inputs) != 2:
        return None
    c0, c1 = is_constant(node.inputs[0]), is_constant(node.inputs[1])
    if c0 == c1:
        return None
    v0 = constant_value(node.inputs[0]) if c0 else None
    v1 = constant_value(node.inputs[1]) if c1 else None
    x, v = (node.inputs[1], v0) if v0 is not None else (node.inputs[0], v1)
    if v is None or v.dtype.kind != "f":
        return None
    return x, v
