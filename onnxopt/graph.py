"""The in-memory IR (onnx-graphsurgeon) and the helpers every pass shares.

onnx-graphsurgeon's weak spots are handled here once: its `toposort()` is
recursive (RecursionError on long graphs), so `toposort` below is an iterative
Kahn sort; `import_model`/`export_model` carry what gs drops (metadata_props,
IR version, model-level fields) so a round trip keeps the model's signature.
"""
from __future__ import annotations

import hashlib
from collections import deque
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs

#: Model-level fields restored on export (gs keeps only the graph).
_KEEP_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Build a gs.Graph from a ModelProto, remembering model-level fields for export."""
    graph = gs.import_onnx(model)
    graph._onnxopt_model_fields = {f: getattr(model, f) for f in _KEEP_FIELDS}
    graph._onnxopt_metadata = [(p.key, p.value) for p in model.metadata_props]
    graph._onnxopt_ir_version = model.ir_version
    graph._onnxopt_functions = list(model.functions)
    graph._onnxopt_io_types = _unexportable_io_types(model.graph)
    return graph


#: Value types onnx-graphsurgeon can export; graph inputs/outputs of other types (optional, map) are restored on export.
_GS_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type")


def _unexportable_io_types(g: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Declared types of the graph inputs/outputs (subgraphs included) that gs cannot write back."""
    out: dict[str, onnx.TypeProto] = {}
    stack = [g]
    while stack:
        cur = stack.pop()
        for vi in list(cur.input) + list(cur.output):
            if vi.type.WhichOneof("value") not in (None, *_GS_TYPES):
                out[vi.name] = vi.type
        for node in cur.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else list(a.graphs))
    return out


def _restore_io_types(g: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    stack = [g]
    while stack:
        cur = stack.pop()
        for vi in list(cur.input) + list(cur.output):
            if vi.name in types:
                vi.type.CopyFrom(types[vi.name])
        for node in cur.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else list(a.graphs))


def _ir_version_for(graph: gs.Graph, original: int | None) -> int:
    """Lowest valid IR version: at least the original, at least 4 (initializers need not be inputs)."""
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in (graph.import_domains and
              [(o.domain, o.version) for o in graph.import_domains] or [("", graph.opset)])]
    try:
        needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    except Exception:
        needed = 4
    return max(original or 0, needed, 4)


def export_model(graph: gs.Graph, sort: bool = True) -> onnx.ModelProto:
    """Turn the gs.Graph back into a ModelProto with the original model-level fields."""
    if sort:
        toposort(graph)
    types = getattr(graph, "_onnxopt_io_types", {})
    hidden = [(t, t.dtype) for g in iter_graphs(graph) for t in list(g.inputs) + list(g.outputs)
              if getattr(t, "type", "tensor_type") not in _GS_TYPES and t.name in types]
    for t, _ in hidden:
        t.dtype = None  # gs would fail on optional/map types: export untyped, then restore the declared type
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for t, dtype in hidden:
            t.dtype = dtype
    if types:
        _restore_io_types(model.graph, types)
    for field, value in getattr(graph, "_onnxopt_model_fields", {}).items():
        setattr(model, field, value)
    del model.metadata_props[:]
    for key, value in getattr(graph, "_onnxopt_metadata", []):
        model.metadata_props.add(key=key, value=value)
    model.ir_version = _ir_version_for(graph, getattr(graph, "_onnxopt_ir_version", None))
    funcs = getattr(graph, "_onnxopt_functions", [])
    if funcs and not model.functions:
        model.functions.extend(funcs)
    return model


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.nodes:
            stack.extend(subgraphs_of(node))


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort nodes topologically in place (iterative Kahn sort; stable for ready nodes).

    Inputs produced by nodes of an enclosing graph count as available. Subgraphs
    are sorted too. Raises ValueError on a cycle.
    """
    for g in iter_graphs(graph):
        _toposort_one(g)
    return graph


def _toposort_one(graph: gs.Graph) -> None:
    nodes = list(graph.nodes)
    producer: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            producer[id(t)] = i
    deps: list[set[int]] = []
    users: list[list[int]] = [[] for _ in nodes]
    for i, n in enumerate(nodes):
        d = set()
        for t in _node_inputs_with_captures(n):
            j = producer.get(id(t))
            if j is not None and j != i:
                d.add(j)
        deps.append(d)
        for j in d:
            users[j].append(i)
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
        stuck = [nodes[i].name or nodes[i].op for i in range(len(nodes)) if remaining[i] > 0][:5]
        raise ValueError(f"graph has a cycle (involving {stuck})")
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


def cleanup(graph: gs.Graph) -> gs.Graph:
    """Remove dead nodes and unused tensors in the graph and its subgraphs; keep graph inputs."""
    graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
    return graph


def graph_hash(graph: gs.Graph) -> str:
    """A content hash of the graph (structure, attributes and weights), used to check `changed`."""
    model = export_model(graph, sort=False)
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def model_hash(model: onnx.ModelProto) -> str:
    """Content hash of a ModelProto."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node producing `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def is_constant(tensor: gs.Tensor) -> bool:
    """True for initializers and tensors computed by a Constant node with a value attribute."""
    if isinstance(tensor, gs.Constant):
        return True
    p = producer(tensor)
    return p is not None and p.op == "Constant" and "value" in p.attrs and not p.inputs


def constant_value(tensor: gs.Tensor):
    """Numpy value of a constant tensor (see `is_constant`), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    p = producer(tensor)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return v.values if isinstance(v, gs.Constant) else None
    return None


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not yet used in the graph, derived from `base`."""
    taken = getattr(graph, "_onnxopt_names", None)
    if taken is None:
        taken = {t for g in iter_graphs(graph) for t in g.tensors()} | {n.name for g in iter_graphs(graph) for n in g.nodes}
        graph._onnxopt_names = taken
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def graph_output_owner(graph: gs.Graph, tensor: gs.Tensor) -> gs.Graph | None:
    """The graph (main or sub) whose outputs list `tensor`, if any."""
    for g in iter_graphs(graph):
        if any(o is tensor for o in g.outputs):
            return g
    return None


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead, subgraph consumers included.

    If `old` is a graph output it keeps its name (the model's signature): `old` is
    then detached from its producer and re-created by an Identity reading `new`.
    """
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    owner = graph_output_owner(graph, old)
    if owner is not None and new is not old:
        old.inputs.clear()
        owner.nodes.append(gs.Node("Identity", name=unique_name(graph, f"{old.name}_keep"), inputs=[new], outputs=[old]))


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    """Subgraph attributes of a node (If branches, Loop/Scan bodies)."""
    subs: list[gs.Graph] = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            subs.append(attr)
        elif isinstance(attr, (list, tuple)):
            subs.extend(a for a in attr if isinstance(a, gs.Graph))
    return subs
