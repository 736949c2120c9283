"""Small rewrites every pass shares: rewiring consumers, detaching nodes, fresh names.

They keep onnx-graphsurgeon's use-def links and the model's signature intact: a graph
output keeps its name when its producer is replaced (an Identity re-creates it).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.ir.graph_state import remember_names, taken_names
from onnxopt.ir.traversal import iter_graphs


def detach(node: gs.Node) -> None:
    """Disconnect a node from all its tensors; `cleanup` then drops it."""
    node.outputs.clear()
    node.inputs.clear()


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used in the graph, derived from `base`.

    The names in use are collected on the first call (per pass: the manager forgets them
    after each) and every name handed out is added, so names stay unique within a pass.
    """
    taken = taken_names(graph)
    if taken is None:
        taken = {t for g in iter_graphs(graph) for t in g.tensors()} | {
            n.name for g in iter_graphs(graph) for n in g.nodes
        }
        remember_names(graph, taken)
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def output_owners(graph: gs.Graph) -> dict[int, gs.Graph]:
    """Map id(tensor) -> the graph (main or sub) listing it as an output; compute once per sweep."""
    return {id(o): g for g in iter_graphs(graph) for o in g.outputs}


def graph_output_owner(
    graph: gs.Graph, tensor: gs.Tensor, owners: dict[int, gs.Graph] | None = None
) -> gs.Graph | None:
    """The graph (main or sub) whose outputs list `tensor`, if any (`owners` from `output_owners`)."""
    if owners is not None:
        return owners.get(id(tensor))
    if any(o is tensor for o in graph.outputs):
        return graph
    return output_owners(graph).get(id(tensor))


def replace_all_uses(
    graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, owners: dict[int, gs.Graph] | None = None
) -> None:
    """Make every consumer of `old` read `new` instead, subgraph consumers included.

    If `old` is a graph output it keeps its name (the model's signature): `old` is
    then detached from its producer and re-created by an Identity reading `new`.
    Hot loops pass `owners` (from `output_owners`) to avoid a walk per call.
    """
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    owner = graph_output_owner(graph, old, owners)
    if owner is not None and new is not old:
        old.inputs.clear()
        owner.nodes.append(
            gs.Node("Identity", name=unique_name(graph, f"{old.name}_keep"), inputs=[new], outputs=[old])
        )
