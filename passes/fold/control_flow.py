"""Control flow with a constant condition: an `If` whose condition folded to a constant is replaced by
the nodes of the branch it takes, renamed where their names clash with the rest of the model."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, detach, iter_graphs, replace_all_uses, unique_name
from onnxopt.ir.graph_state import node_docs


def inline_constant_ifs(graph: gs.Graph, counts: dict) -> int:
    """Replace `If` nodes whose condition is a constant by the nodes of the taken branch."""
    n = 0
    for g in list(iter_graphs(graph)):
        for node in list(g.nodes):
            if node.op == "If" and _inline_if(graph, g, node):
                n += 1
    counts["if_inlined"] += n
    return n


def _taken_branches(node: gs.Node) -> tuple[gs.Graph, gs.Graph] | None:
    """(branch taken, branch never taken) of an `If` with a constant single-value condition."""
    cond = constant_value(node.inputs[0]) if node.inputs else None
    if cond is None or np.asarray(cond).size != 1:
        return None
    taken = bool(np.asarray(cond).reshape(-1)[0])
    names = ("then_branch", "else_branch") if taken else ("else_branch", "then_branch")
    return node.attrs[names[0]], node.attrs[names[1]]


def _inline_if(graph: gs.Graph, g: gs.Graph, node: gs.Node) -> bool:
    """Put the taken branch of `If` node `node` (of graph `g`) in its place; False if it cannot."""
    branches = _taken_branches(node)
    if branches is None:
        return False
    branch, other = branches
    if len(branch.outputs) != len(node.outputs):
        return False
    for sub in iter_graphs(other):  # the branch never taken stops reading outer tensors
        for dropped in list(sub.nodes):
            detach(dropped)
    _rename_clashing(graph, branch)
    g.nodes.extend(branch.nodes)
    for inner, outer in zip(list(branch.outputs), list(node.outputs)):
        replace_all_uses(graph, outer, inner)
    branch.nodes.clear()
    branch.outputs.clear()
    detach(node)
    return True


def _names_outside(graph: gs.Graph, branch: gs.Graph) -> tuple[set[str], set[str], set[int]]:
    """(node names, tensor names, tensor ids) of every graph of the model outside `branch`."""
    inner = {id(sub) for sub in iter_graphs(branch)}
    node_names: set[str] = set()
    tensor_names: set[str] = set()
    outside: set[int] = set()
    for sub in iter_graphs(graph):
        if id(sub) in inner:
            continue
        node_names.update(n.name for n in sub.nodes)
        used = [t for n in sub.nodes for t in list(n.inputs) + list(n.outputs)]
        for t in list(sub.inputs) + list(sub.outputs) + used:
            tensor_names.add(t.name)
            outside.add(id(t))
    return node_names, tensor_names, outside


def _rename_clashing(graph: gs.Graph, branch: gs.Graph) -> None:
    """Before `branch` is inlined: rename its nodes and its own tensors whose names are used elsewhere in
    the model (the other branch, sibling bodies, the enclosing graph), so names stay unique once it
    joins the enclosing graph. Tensors it shares with the enclosing scope keep their names."""
    node_names, tensor_names, outside = _names_outside(graph, branch)
    docs = node_docs(graph)  # doc strings are kept by node name
    for sub in iter_graphs(branch):
        for n in sub.nodes:
            if n.name in node_names:
                old, n.name = n.name, unique_name(graph, n.name)
                if docs is not None and old in docs:
                    docs[n.name] = docs[old]
            for t in list(n.inputs) + list(n.outputs):
                if t.name and t.name in tensor_names and id(t) not in outside:
                    t.name = unique_name(graph, t.name)
