"""Walking graphs: every (sub)graph of a gs.Graph or GraphProto, and an iterative topological sort.

onnx-graphsurgeon's own `toposort()` is recursive and raises RecursionError on long,
out-of-order graphs; `toposort` here is an iterative Kahn sort, used everywhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import onnx
import onnx_graphsurgeon as gs


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    """Subgraph attributes of a node (If branches, Loop/Scan bodies)."""
    subs: list[gs.Graph] = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            subs.append(attr)
        elif isinstance(attr, (list, tuple)):
            subs.extend(a for a in attr if isinstance(a, gs.Graph))
    return subs


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.nodes:
            stack.extend(subgraphs_of(node))


def subgraph_protos(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a NodeProto holds in its graph attributes (If branches, Loop/Scan bodies)."""
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]


def all_graph_protos(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and all its subgraphs, outermost first."""
    stack = [g]
    while stack:
        cur = stack.pop()
        yield cur
        for node in cur.node:
            stack.extend(subgraph_protos(node))


def model_opsets(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """The opset imports of a graph: its import domains, else the default domain at `graph.opset`."""
    if graph.import_domains:
        return [onnx.helper.make_opsetid(o.domain, o.version) for o in graph.import_domains]
    return [onnx.helper.make_opsetid("", graph.opset)]


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Remove dead nodes and unused tensors in the graph and its subgraphs; keep graph inputs."""
    graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
    return graph


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort nodes topologically in place (iterative Kahn sort; stable for ready nodes).

    Inputs produced by nodes of an enclosing graph count as available. Subgraphs
    are sorted too. Raises ValueError on a cycle.
    """
    for g in iter_graphs(graph):
        _toposort_one(g)
    return graph


def _dependencies(nodes: list[gs.Node]) -> tuple[list[set[int]], list[list[int]]]:
    """For each node (by position): the nodes it reads from, and the nodes reading from it."""
    producer: dict[int, int] = {id(t): i for i, n in enumerate(nodes) for t in n.outputs}
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = {j for t in _node_inputs_with_captures(n) if (j := producer.get(id(t))) is not None and j != i}
        deps.append(d)
        for j in d:
            users[j].append(i)
    return deps, users


def _toposort_one(graph: gs.Graph) -> None:
    nodes = list(graph.nodes)
    deps, users = _dependencies(nodes)
    remaining = [len(d) for d in deps]
    ready = deque(i for i in range(len(nodes)) if remaining[i] == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in sorted(users[i]):
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError(f"graph has a cycle: {_describe_cycle(nodes, deps, remaining)}")
    graph.nodes = [nodes[i] for i in order]


def _node_inputs_with_captures(node: gs.Node) -> list[gs.Tensor]:
    """A node's inputs plus outer tensors its subgraphs read (implicit inputs)."""
    tensors = list(node.inputs)
    for sub in subgraphs_of(node):
        for g in iter_graphs(sub):
            local = {id(t) for n in g.nodes for t in n.outputs} | {id(t) for t in g.inputs}
            for n in g.nodes:
                tensors.extend(t for t in n.inputs if id(t) not in local)
    return tensors


def _describe_cycle(nodes: list[gs.Node], deps: list[set[int]], remaining: list[int]) -> str:
    """Name the nodes of one cycle among the nodes a sort could not place (networkx finds it)."""
    import networkx as nx  # only on this error path: not worth its import time on every run

    stuck = [i for i in range(len(nodes)) if remaining[i] > 0]
    g = nx.DiGraph((j, i) for i in stuck for j in deps[i] if remaining[j] > 0)
    try:
        cycle = [u for u, _ in nx.find_cycle(g)]
    except nx.NetworkXNoCycle:
        cycle = stuck[:5]
    names = [nodes[i].name or nodes[i].op for i in cycle[:12]]
    return " -> ".join(names) + (" -> ..." if len(cycle) > 12 else "")
