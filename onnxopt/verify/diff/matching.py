"""Which tensor of the candidate holds the value of which tensor of the reference.

The passes keep the names of the tensors they do not remove, and record no map
of what they replaced, so the match is read from the graphs' structure:

- a tensor of the same name produced by a node in both models matches itself
  (fold, fuse and lowrank keep the name of the last tensor of what they
  rewrite: a fused Conv writes the Relu's output name, a factor pair the
  MatMul's);
- when the candidate quantizes that tensor (`QuantizeLinear` then
  `DequantizeLinear`), the `DequantizeLinear` output matches instead: it is the
  value the next layers read, rounding included;
- a tensor the candidate computes as a constant (folded) or no longer has
  (inside a fused pattern) is not compared; its error shows in the next
  matched tensor.

Each match also gets its *layer*: the candidate's nodes that compute it from
earlier matched tensors, graph inputs and constants (`layer_region`). Fed the
reference's values of those earlier tensors, the layer shows its own error,
apart from the error it received.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx

from onnxopt.ir.traversal import subgraph_protos

#: A layer larger than this many nodes is not extracted (its own error is not measured).
MAX_LAYER_NODES = 256


@dataclass
class Match:
    """One reference tensor and the candidate tensor holding its value."""

    ref: str
    cand: str
    #: Position of the reference tensor's producer in the reference's topological order.
    depth: int
    #: The reference node that writes the tensor, and its op type.
    node: str
    op: str
    #: How the pair was found: "name" or "qdq".
    how: str = "name"


@dataclass
class Layer:
    """The candidate nodes that compute one matched tensor from earlier matched values (node indices, in
    the candidate's order), the tensors it reads from outside (`frontier`), and its weights."""

    nodes: list[int] = field(default_factory=list)
    frontier: list[str] = field(default_factory=list)
    initializers: list[str] = field(default_factory=list)
    #: Why the layer could not be extracted ("" when it was).
    problem: str = ""


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The main graph's nodes in an order where each comes after the producers of its inputs (Kahn)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    deps = [{producer[t] for t in _reads(n) if t in producer and producer[t] != i} for i, n in enumerate(graph.node)]
    users: list[list[int]] = [[] for _ in graph.node]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = deque(i for i, p in enumerate(pending) if p == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    seen = set(order)
    order += [i for i in range(len(graph.node)) if i not in seen]  # a cycle: keep the file's order
    return [graph.node[i] for i in order]


def _reads(node: onnx.NodeProto) -> list[str]:
    """Tensors a node reads: its inputs and the outer-scope names its bodies capture."""
    names = [i for i in node.input if i]
    for body in subgraph_protos(node):
        local = {i.name for i in body.input} | {t.name for t in body.initializer}
        for n in body.node:
            local.update(n.output)
            names += [i for i in _reads(n) if i not in local]
    return names


def _quantized_value(graph: onnx.GraphProto, name: str) -> str | None:
    """The `DequantizeLinear` output that re-reads `name` through a `QuantizeLinear` in `graph`, if any."""
    q_outputs = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input and n.input[0] == name}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in q_outputs:
            return n.output[0]
    return None


def match_tensors(ref: onnx.ModelProto, cand: onnx.ModelProto) -> list[Match]:
    """The matched tensors, in the reference's topological order (see the module's docstring)."""
    cand_made = {o for n in cand.graph.node for o in n.output if o}
    cand_consts = {t.name for t in cand.graph.initializer}
    matches = []
    for depth, node in enumerate(topological_nodes(ref.graph)):
        for out in node.output:
            if not out or out not in cand_made or out in cand_consts:
                continue
            dq = _quantized_value(cand.graph, out)
            how = "qdq" if dq else "name"
            matches.append(Match(out, dq or out, depth, node.name or f"#{depth}", node.op_type, how))
    return matches


def layer_region(cand: onnx.ModelProto, target: str, matched: set[str], producer: dict[str, int]) -> Layer:
    """The candidate nodes computing `target` back to matched tensors, graph inputs and initializers.

    `matched`: the candidate's matched tensor names (`target` among them); `producer`: tensor name -> node
    index. A graph input or a tensor nobody writes is read from outside, like a matched one.
    """
    g = cand.graph
    inits = {t.name for t in g.initializer}
    layer = Layer()
    seen_nodes: set[int] = set()
    stack = [producer[target]]
    while stack:
        i = stack.pop()
        if i in seen_nodes:
            continue
        seen_nodes.add(i)
        if len(seen_nodes) > MAX_LAYER_NODES:
            return Layer(problem=f"more than {MAX_LAYER_NODES} nodes back to the previous matched tensors")
        if subgraph_protos(g.node[i]):
            return Layer(problem=f"holds a control-flow node ({g.node[i].op_type})")
        for name in g.node[i].input:
            if not name:
                continue
            if name in inits:
                layer.initializers.append(name)
            elif (name in matched and name != target) or name not in producer:
                layer.frontier.append(name)  # an earlier matched tensor or a graph input
            else:
                stack.append(producer[name])
    layer.nodes = sorted(seen_nodes)
    layer.frontier = list(dict.fromkeys(layer.frontier))
    layer.initializers = list(dict.fromkeys(layer.initializers))
    return layer


def layer_regions(cand: onnx.ModelProto, matches: list[Match]) -> list[Layer]:
    """The layer (`layer_region`) of each match's candidate tensor."""
    producer = {o: i for i, n in enumerate(cand.graph.node) for o in n.output if o}
    matched = {m.cand for m in matches}
    return [layer_region(cand, m.cand, matched, producer) for m in matches]
