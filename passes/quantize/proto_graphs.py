"""Reading a ModelProto's graphs: the main graph and its If/Loop/Scan bodies, their constants, the
names their nodes read.

The quantize pass works on ModelProtos (see the package docstring for why); these are the few
walks over them that its modules share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
from onnx import TensorProto

from onnxopt.ir.graph import subgraph_protos

#: (graph, where, scopes) as `walk_graphs` yields them.
Scoped = tuple[onnx.GraphProto, str, list[dict[str, TensorProto]]]


def used_names(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name read by `nodes`, including reads from inside their subgraphs (If/Loop bodies)."""
    used: set[str] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        used.update(n.input)
        for sub in subgraph_protos(n):
            stack.extend(sub.node)
    return used


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every subgraph a node holds."""
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append((a.name, a.g))
        found += [(a.name, sub) for sub in a.graphs]
    return found


def walk_graphs(graph: onnx.GraphProto, where: str = "main graph") -> Iterator[Scoped]:
    """(graph, where, scopes) for `graph` and every subgraph below it, parents first: `where` names it
    ("If '/If' then_branch"), `scopes` lists the constants (initializers and Constant values by
    name) visible in it, innermost first, itself included."""
    stack: list[tuple[onnx.GraphProto, str, list[dict[str, TensorProto]]]] = [(graph, where, [])]
    while stack:
        g, here, outer = stack.pop(0)
        scopes = [graph_constants(g)] + outer
        yield g, here, scopes
        for n in g.node:
            for attr, sub in _subgraphs(n):
                stack.append((sub, f"{n.op_type} '{n.name}' {attr}", scopes))


def constant_node_value(n: onnx.NodeProto) -> TensorProto | None:
    """The tensor a `Constant <value=...>` node holds (None for any other node)."""
    if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
        return n.attribute[0].t
    return None


def graph_constants(g: onnx.GraphProto) -> dict[str, TensorProto]:
    """Constant tensors defined in `g` itself: initializers that are not graph inputs (those can be
    overridden at run time) and the values of Constant nodes."""
    inputs = {i.name for i in g.input}
    found = {t.name: t for t in g.initializer if t.name not in inputs}
    for n in g.node:
        value = constant_node_value(n)
        if value is not None:
            found[n.output[0]] = value
    return found
