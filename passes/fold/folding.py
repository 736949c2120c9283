"""Constant folding: evaluate what depends only on constants, fold static shape arithmetic.

Per iteration, until nothing changes:
1. Constant nodes become initializers; Identity and inference-time Dropout go.
2. `If` nodes with a constant condition are replaced by the taken branch.
3. Shape arithmetic is folded from inferred static dimensions (partly known
   shapes too: a Reshape target with one dynamic entry becomes -1); dynamic
   axes are never frozen.
4. Nodes whose inputs are all constant are evaluated by onnxruntime in one
   batch per graph (falling back per node, then to `onnx.reference`).

Never folded: random ops, Q/DQ (their pattern is what runtimes fuse), ops of
non-standard domains, sequence/optional ops, and generators (ConstantOfShape,
Expand, Tile, Range) whose output would exceed `size_limit_mb`: the generator
stays and is reported, what follows it still folds where shapes allow.

The steps live in modules named for them: `selection` (what may fold),
`evaluation` (running it), `constants`, `noops` and `views` (exact eliminations),
`control_flow` (constant Ifs), `shape_folding` with `shape_values`, and `cse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.framework.context import PassContext
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import cleanup, iter_graphs, toposort
from onnxopt.ir.graph_state import overridable_defaults
from onnxopt.passes.fold.constants import constant_bytes, constants_to_initializers
from onnxopt.passes.fold.control_flow import inline_constant_ifs
from onnxopt.passes.fold.cse import eliminate_common_subexpressions
from onnxopt.passes.fold.evaluation import evaluate_nodes
from onnxopt.passes.fold.noops import eliminate_redundant_nodes, may_be_redundant, remove_identities
from onnxopt.passes.fold.selection import foldable_nodes, size_limit_bytes
from onnxopt.passes.fold.shape_folding import fold_shapes


@register_pass("fold")
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static shape arithmetic; drop Identity, Dropout and dead nodes."""

    tolerance = "exact"

    @dataclass
    class Options(Pass.Options):
        size_limit_mb: float = option(
            1.0,
            "never materialize a tensor larger than this from a generator "
            "(ConstantOfShape/Expand/Tile/Range); 0 = no limit",
            low=0,
        )
        shapes: bool = option(True, "fold shape arithmetic from inferred static dimensions")
        cse: bool = option(True, "merge identical constants and nodes computing the same thing")
        max_iterations: int = option(10, "stop after this many rounds even if more could fold", low=1)

    options: Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {
            "constant_nodes": 0,
            "identity_removed": 0,
            "if_inlined": 0,
            "shape_folded": 0,
            "reshape_partial": 0,
            "folded_nodes": 0,
            "cse_merged": 0,
            "dead_nodes": 0,
        }
        self._skipped: dict[str | int, dict[str, str]] = {}
        limit = size_limit_bytes(self.options.size_limit_mb)
        bytes_before = constant_bytes(graph)
        changed = False
        for _ in range(self.options.max_iterations):
            if self._round(graph, ctx, limit, counts) == 0:
                break
            changed = True
        grown = constant_bytes(graph) - bytes_before
        if grown > 0:  # folded generators (Tile, Expand...) can be larger than what computed them
            counts["constant_bytes_added"] = grown
        self._skip_overridable(graph)
        return PassResult(
            changed=changed,
            stats=counts,
            skipped=list(self._skipped.values()),
            reason=""
            if changed
            else "nothing left to fold: no constant subgraph, Identity, "
            "constant If, shape computation or duplicate node",
        )

    def _round(self, graph: gs.Graph, ctx: PassContext, limit: int | None, counts: dict) -> int:
        """One iteration of every step; how many edits it made (0: a fixed point).

        Shapes come from the `shapes` analysis of the context (main graph). Each step that edits the
        graph drops it, so the next step that needs shapes infers them again; a step that edits
        nothing lets the next one reuse them. The round ends by dropping it too, since a round can
        change the graph in ways its counts do not show (a node folded for one of two outputs)."""
        step = self._edited(ctx, constants_to_initializers(graph, counts))
        if self.options.shapes:
            step += self._edited(ctx, self._eliminate_redundant(graph, ctx, counts))
        step += self._edited(ctx, remove_identities(graph, counts) + inline_constant_ifs(graph, counts))
        if self.options.shapes:
            step += fold_shapes(graph, counts, _sorted_shapes(graph, ctx))
        step += self._fold_constants(graph, limit, counts)
        if self.options.cse:
            step += eliminate_common_subexpressions(graph, counts)
        step += _remove_dead(graph, counts)
        ctx.invalidate()
        return step

    @staticmethod
    def _edited(ctx: PassContext, edits: int) -> int:
        """`edits`, after dropping the cached analyses when there were any."""
        if edits:
            ctx.invalidate()
        return edits

    @staticmethod
    def _eliminate_redundant(graph: gs.Graph, ctx: PassContext, counts: dict) -> int:
        """`eliminate_redundant_nodes` with inferred shapes (only inferred when a candidate is there)."""
        if not may_be_redundant(graph):
            return 0
        return eliminate_redundant_nodes(graph, counts, ctx.analysis("shapes", graph))

    def _skip(self, node: gs.Node, reason: str) -> None:
        self._skipped[node.name or id(node)] = {"node": node.name, "op": node.op, "reason": reason}

    def _skip_overridable(self, graph: gs.Graph) -> None:
        """List overridable initializers (also graph inputs) that were read: kept as inputs, not folded."""
        overridable = overridable_defaults(graph)
        for t in graph.inputs:
            if t.name in overridable and t.outputs:
                self._skipped[t.name] = {
                    "node": t.name,
                    "op": "initializer",
                    "reason": "overridable initializer (also a graph input): kept as an "
                    "input, not folded in as a constant",
                }

    def _fold_constants(self, graph: gs.Graph, limit: int | None, counts: dict) -> int:
        """Evaluate what every graph (bodies included) computes from constants alone; how many nodes folded."""
        total = 0
        for g in list(iter_graphs(graph)):
            toposort(g)
            foldable = foldable_nodes(graph, g, limit, self._skip)
            if foldable:
                total += evaluate_nodes(graph, foldable, self._skip)
        counts["folded_nodes"] += total
        return total


def _sorted_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, TensorInfo]:
    """The `shapes` analysis of `graph`, with its nodes (bodies too) in topological order, as shape
    folding reads them. Inferring sorts the graph; a cached result did so when it was computed and
    the sort is idempotent, so sorting again here keeps the order what fresh inference gives."""
    toposort(graph)
    return ctx.analysis("shapes", graph)


def _remove_dead(graph: gs.Graph, counts: dict) -> int:
    """Clean up the graph; how many nodes went (nodes still producing something that nothing reads)."""
    live = sum(1 for g in iter_graphs(graph) for n in g.nodes if n.outputs)
    cleanup(graph)
    dead = max(0, live - sum(len(g.nodes) for g in iter_graphs(graph)))
    counts["dead_nodes"] += dead
    return dead
