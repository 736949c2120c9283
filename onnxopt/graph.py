"""The in-memory IR (onnx-graphsurgeon) and the helpers every pass shares.

onnx-graphsurgeon's weak spots are handled here once: its `toposort()` is
recursive (RecursionError on long graphs), so `toposort` below is an iterative
Kahn sort; `import_model`/`export_model` carry what gs drops (metadata_props,
IR version, model-level fields) so a round trip keeps the model's signature.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
from collections import deque
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import weights

#: Model-level fields restored on export (gs keeps only the graph).
_KEEP_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Build a gs.Graph from a ModelProto, remembering model-level fields for export."""
    graph = gs.import_onnx(_stash_type_attributes(model))
    graph._onnxopt_mapped = _map_external_constants(graph)
    name_unnamed_nodes(graph)
    graph._onnxopt_model_fields = {f: getattr(model, f) for f in _KEEP_FIELDS}
    graph._onnxopt_metadata = [(p.key, p.value) for p in model.metadata_props]
    graph._onnxopt_ir_version = model.ir_version
    graph._onnxopt_functions = list(model.functions)
    graph._onnxopt_io_types = _unexportable_io_types(model.graph)
    return graph


class MappedValues(LazyValues):
    """gs lazy values of a staged external tensor: loading memory-maps the file (`onnxopt.weights`)
    instead of reading it into the TensorProto and copying it twice, as gs's own loader would."""

    def load(self) -> np.ndarray:
        return weights.mapped(self.tensor)


def _map_external_constants(graph: gs.Graph) -> bool:
    """Give every constant whose tensor is staged on disk `MappedValues`; True if there was one."""
    found = False
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            v = getattr(t, "_values", None)
            if isinstance(t, gs.Constant) and isinstance(v, LazyValues) and weights.is_external(v.tensor):
                t._values = MappedValues(v.tensor)
                found = True
    return found


#: Value types onnx-graphsurgeon can export; graph inputs/outputs of other types (optional, map) are restored on export.
_GS_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type")


def _unexportable_io_types(g: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Declared types of the graph inputs/outputs (subgraphs included) that gs cannot write back."""
    return {vi.name: vi.type for cur in _all_graph_protos(g) for vi in list(cur.input) + list(cur.output)
            if vi.type.WhichOneof("value") not in (None, *_GS_TYPES)}


#: gs drops TYPE_PROTO attributes (e.g. `Optional <type=...>`); they travel through it as base64 strings under this prefix.
_TYPE_ATTR_PREFIX = "_onnxopt_type_proto:"


def _all_graph_protos(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A GraphProto and all its subgraphs."""
    stack = [g]
    while stack:
        cur = stack.pop()
        yield cur
        for node in cur.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else list(a.graphs))


def _stash_type_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, or a copy whose TYPE_PROTO attributes are base64 strings gs keeps (undone on export)."""
    if not any(a.type == onnx.AttributeProto.TYPE_PROTO for g in _all_graph_protos(model.graph)
               for n in g.node for a in n.attribute):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for g in _all_graph_protos(copy.graph):
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TYPE_PROTO:
                    encoded = base64.b64encode(a.tp.SerializeToString()).decode()
                    a.CopyFrom(onnx.helper.make_attribute(_TYPE_ATTR_PREFIX + a.name, encoded))
    return copy


def _unstash_type_attributes(g: onnx.GraphProto) -> None:
    for cur in _all_graph_protos(g):
        for node in cur.node:
            for a in node.attribute:
                if a.name.startswith(_TYPE_ATTR_PREFIX):
                    tp = onnx.TypeProto()
                    tp.ParseFromString(base64.b64decode(a.s))
                    a.CopyFrom(onnx.helper.make_attribute(a.name[len(_TYPE_ATTR_PREFIX):], tp))


@contextlib.contextmanager
def _gs_exportable(graph: gs.Graph) -> Iterator[None]:
    """Inputs/outputs of types gs cannot export (optional, map) are untyped while gs exports the graph."""
    types = getattr(graph, "_onnxopt_io_types", {})
    hidden = [(t, t.dtype) for g in iter_graphs(graph) for t in list(g.inputs) + list(g.outputs)
              if getattr(t, "type", "tensor_type") not in _GS_TYPES and t.name in types]
    for t, _ in hidden:
        t.dtype = None
    try:
        yield
    finally:
        for t, dtype in hidden:
            t.dtype = dtype


def _finish_export(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """Undo what gs cannot carry: declared optional/map types, TYPE_PROTO attributes."""
    types = getattr(graph, "_onnxopt_io_types", {})
    if types:
        _restore_io_types(g, types)
    _unstash_type_attributes(g)


def _restore_io_types(g: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    for cur in _all_graph_protos(g):
        for vi in list(cur.input) + list(cur.output):
            if vi.name in types:
                vi.type.CopyFrom(types[vi.name])


def name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every unnamed node a unique name `<Op>_<k>`.

    onnx-graphsurgeon compares nodes by name, op, attributes and tensor names when
    it updates use-def lists; two unnamed nodes alike in those would be mistaken
    for each other. Names also make reports, placement logs and patterns usable.
    """
    taken = {n.name for g in iter_graphs(graph) for n in g.nodes if n.name}
    counters: dict[str, int] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.name:
                continue
            while True:
                counters[node.op] = counters.get(node.op, 0) + 1
                name = f"{node.op}_{counters[node.op]}"
                if name not in taken:
                    break
            node.name = name
            taken.add(name)


def model_opsets(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """The opset imports of a graph: its import domains, else the default domain at `graph.opset`."""
    if graph.import_domains:
        return [onnx.helper.make_opsetid(o.domain, o.version) for o in graph.import_domains]
    return [onnx.helper.make_opsetid("", graph.opset)]


def detach(node: gs.Node) -> None:
    """Disconnect a node from all its tensors; `cleanup` then drops it."""
    node.outputs.clear()
    node.inputs.clear()


def _ir_version_for(graph: gs.Graph, original: int | None) -> int:
    """Lowest valid IR version: at least the original, at least 4 (initializers need not be inputs)."""
    opsets = model_opsets(graph)
    try:
        needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    except Exception:
        needed = 4
    return max(original or 0, needed, 4)


def export_model(graph: gs.Graph, sort: bool = True, into: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Turn the gs.Graph back into a ModelProto with the original model-level fields.

    With `into` (the proto the graph was imported from, which the caller gives up),
    the result is written into it: initializers the passes left untouched stay where
    they are instead of being copied, so big models are not held twice.
    """
    if sort:
        toposort(graph)
    if into is None and _is_mapped(graph):
        into = onnx.ModelProto()  # weights staged on disk stay there; big new ones are spilled beside them
    if into is not None:
        return _export_into(graph, into)
    return _gs_export(graph)


def _gs_export(graph: gs.Graph) -> onnx.ModelProto:
    """onnx-graphsurgeon's export plus what it drops (model fields, metadata, IR version, functions)."""
    with _gs_exportable(graph):
        model = gs.export_onnx(graph, do_type_check=False)
    _finish_export(graph, model.graph)
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


def _export_into(graph: gs.Graph, into: onnx.ModelProto) -> onnx.ModelProto:
    """`export_model` into the source proto: untouched initializers stay in place, new ones are written once.

    onnx-graphsurgeon would copy every weight into a new proto (and protobuf copies
    again on append); here the main graph's constants are hidden from it, the
    source proto drops the initializers no longer used, then each new constant's
    bytes are written straight into it.
    """
    owned = {id(t) for t in into.graph.initializer}
    consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    values = {id(t): t._values for t in consts}
    keep = {id(v.tensor) for t in consts for v in [values[id(t)]]
            if isinstance(v, LazyValues) and id(v.tensor) in owned and v.tensor.name == t.name}
    for t in consts:  # hidden from gs, so it copies no weight
        t.to_variable(dtype=t.dtype, shape=t.shape)
        t.type = "tensor_type"
    try:
        model = _gs_export(graph)
    finally:
        for t in consts:
            t.to_constant(values[id(t)])
    g = into.graph
    for i in range(len(g.initializer) - 1, -1, -1):
        if id(g.initializer[i]) not in keep:
            del g.initializer[i]
    names = {t.name for t in consts}
    for f in ("node", "input", "output", "value_info", "sparse_initializer"):
        del getattr(g, f)[:]
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(v for v in model.graph.value_info if v.name not in names)
    g.sparse_initializer.extend(model.graph.sparse_initializer)
    for t in consts:
        v = values[id(t)]
        if not (isinstance(v, LazyValues) and id(v.tensor) in keep):
            _write_constant(g.initializer.add(), t, graph)
    g.name, g.doc_string = model.graph.name, model.graph.doc_string
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(into, f, getattr(model, f))
    for f in ("opset_import", "metadata_props", "functions"):
        del getattr(into, f)[:]
        getattr(into, f).extend(getattr(model, f))
    return into


def _stage_constant(t: gs.Constant) -> onnx.TensorProto:
    """Spill constant `t`'s array to the staging directory and let `t` map it from there: the array
    leaves memory and every later export refers to the file. Returns the staged tensor."""
    proto = onnx.TensorProto(name=t.name)
    weights.spill(t.values, proto)
    t._values = MappedValues(proto)
    return proto


def _is_mapped(graph: gs.Graph) -> bool:
    """True for a graph imported from a model whose weights are staged on disk (`onnxopt.weights`)."""
    return getattr(graph, "_onnxopt_mapped", False)


def _raw_array(t: gs.Constant) -> np.ndarray | None:
    """The array of an in-memory numeric constant whose bytes are written as they are (gs converts
    nothing on export), else None."""
    v = t._values
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
        return None
    exported = getattr(t, "_export_dtype", None)  # set when gs is to convert the values on export
    return v if exported is None or (not isinstance(exported, int) and np.dtype(exported) == v.dtype) else None


def _spillable(graph: gs.Graph, t: gs.Constant) -> bool:
    """Whether `t` is a large in-memory weight of a graph whose weights are staged on disk."""
    arr = _raw_array(t)
    return arr is not None and arr.nbytes >= weights.SPILL_BYTES and _is_mapped(graph)


def new_constant(graph: gs.Graph, name: str, values: np.ndarray) -> gs.Constant:
    """A constant for a weight a pass computed. In a graph whose weights are staged on disk (big
    models, `onnxopt.weights`) a large one is spilled there at once, so a pass rewriting many
    weights holds one new weight at a time, not all of them until export."""
    c = gs.Constant(name, values)
    if _spillable(graph, c):
        _stage_constant(c)
    return c


def stage_new_constants(graph: gs.Graph) -> None:
    """In a graph whose weights are staged on disk, spill every large in-memory constant (the
    manager calls it after each pass, for passes that create constants another way)."""
    if not _is_mapped(graph):
        return
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and _spillable(graph, t):
                _stage_constant(t)


def _write_constant(proto: onnx.TensorProto, t: gs.Constant, graph: gs.Graph) -> None:
    """Fill `proto` with constant `t` of `graph`: a still-lazy tensor is copied as stored (staged ones
    by reference); an array's bytes are copied once, or spilled to the staging directory when the
    graph's weights are staged there and it is large (`_spillable`)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    if isinstance(t._values, LazyValues):
        proto.CopyFrom(t._values.tensor)
        proto.name = t.name
        return
    arr = _raw_array(t)
    if arr is None:
        proto.CopyFrom(OnnxExporter.export_tensor_proto(t))
        return
    if _spillable(graph, t):
        proto.CopyFrom(_stage_constant(t))
        return
    proto.name = t.name
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    proto.dims.extend(arr.shape)
    proto.raw_data = np.ascontiguousarray(arr).tobytes()


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
    import networkx as nx

    stuck = [i for i in range(len(nodes)) if remaining[i] > 0]
    g = nx.DiGraph((j, i) for i in stuck for j in deps[i] if remaining[j] > 0)
    try:
        cycle = [u for u, _ in nx.find_cycle(g)]
    except nx.NetworkXNoCycle:
        cycle = stuck[:5]
    return " -> ".join(nodes[i].name or nodes[i].op for i in cycle[:12]) + (" -> ..." if len(cycle) > 12 else "")


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


def constant_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a constant tensor (see `is_constant`) from metadata, without loading its values."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    p = producer(tensor)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return tuple(p.attrs["value"].shape)
    return None


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


def output_owners(graph: gs.Graph) -> dict[int, gs.Graph]:
    """Map id(tensor) -> the graph (main or sub) listing it as an output; compute once per sweep."""
    return {id(o): g for g in iter_graphs(graph) for o in g.outputs}


def graph_output_owner(graph: gs.Graph, tensor: gs.Tensor, owners: dict[int, gs.Graph] | None = None
                       ) -> gs.Graph | None:
    """The graph (main or sub) whose outputs list `tensor`, if any (`owners` from `output_owners`)."""
    if owners is not None:
        return owners.get(id(tensor))
    if any(o is tensor for o in graph.outputs):
        return graph
    return output_owners(graph).get(id(tensor))


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor,
                     owners: dict[int, gs.Graph] | None = None) -> None:
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


#: Constants larger than this are exported as typed inputs by `export_structure`.
STRUCTURE_MAX_CONST_BYTES = 1 << 16


def export_structure(graph: gs.Graph) -> onnx.ModelProto:
    """A ModelProto of the graph for shape inference and statistics, without large weights.

    Constants over `STRUCTURE_MAX_CONST_BYTES` become typed graph inputs, so no
    weight is copied (models over 2 GB included). Not a runnable model.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    toposort(graph)
    with _gs_exportable(graph):
        return _export_structure(graph, OnnxExporter)


def _export_structure(graph: gs.Graph, OnnxExporter) -> onnx.ModelProto:  # noqa: N803 - gs's exporter class
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    inits, seen = [], set()
    for node in graph.nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or t.name in seen:
                continue
            seen.add(t.name)
            nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize if t.shape is not None else 0
            if nbytes > STRUCTURE_MAX_CONST_BYTES:
                inputs.append(onnx.helper.make_tensor_value_info(
                    t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape)))
            else:
                inits.append(OnnxExporter.export_tensor_proto(t))
    g = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in graph.nodes], graph.name or "g", inputs,
                               [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs],
                               inits)
    opsets = model_opsets(graph)
    model = onnx.helper.make_model(g, opset_imports=opsets)
    model.ir_version = _ir_version_for(graph, getattr(graph, "_onnxopt_ir_version", None))
    model.functions.extend(getattr(graph, "_onnxopt_functions", []))
    _finish_export(graph, model.graph)
    return model
