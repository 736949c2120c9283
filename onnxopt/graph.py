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
    graph._onnxopt_declared_io = {vi.name: _copied(vi) for vi in list(model.graph.input) + list(model.graph.output)}
    graph._onnxopt_node_docs = _node_doc_strings(graph, model.graph)
    _apply_declared_io(graph, model.graph)
    _keep_overridable_initializers(graph, model.graph, model.ir_version)
    return graph


def _keep_overridable_initializers(graph: gs.Graph, g: onnx.GraphProto, ir_version: int) -> None:
    """Initializers also listed as graph inputs are defaults the caller may override: gs drops them from
    the inputs and makes them constants, which would let passes bake them in. They stay graph inputs
    (variables, at their place in the signature) and their defaults are written back on export.

    Below IR 4 every initializer had to be listed as an input, so the listing says nothing about the
    author's intent; onnxruntime treats them as constants there, and so do we."""
    inits = {t.name: t for t in g.initializer}
    overridable = [vi.name for vi in g.input if vi.name in inits] if ir_version >= 4 else []
    graph._onnxopt_overridable = {name: inits[name] for name in overridable}
    if not overridable:
        return
    tensors = graph.tensors()
    by_name = {t.name: t for t in graph.inputs}
    declared = {vi.name: vi for vi in g.input}
    for name in overridable:
        init = inits[name]
        t = tensors.get(name) or gs.Variable(name)
        if isinstance(t, gs.Constant):
            t.to_variable()
        t.type = "tensor_type"
        try:
            t.dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        except Exception:
            t.dtype = init.data_type
        tt = declared[name].type.tensor_type
        # the declared input shape, which an override may fill differently; the default's dims if none
        t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
            if tt.HasField("shape") else list(init.dims)
        by_name[name] = t
    graph.inputs = [by_name[vi.name] for vi in g.input if vi.name in by_name]


def _copied(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of a (small) ValueInfoProto, independent of the model proto an export may later rewrite."""
    c = onnx.ValueInfoProto()
    c.CopyFrom(vi)
    return c


def _node_doc_strings(graph: gs.Graph, g: onnx.GraphProto) -> dict[str, str]:
    """Node doc strings by node name (gs drops them): main-graph nodes matched by position (gs keeps
    the order, unnamed ones have just been named), subgraph nodes by their own names."""
    docs = {n.name: p.doc_string for n, p in zip(graph.nodes, g.node) if p.doc_string}
    for sub in all_graph_protos(g):
        if sub is not g:
            docs.update((p.name, p.doc_string) for p in sub.node if p.name and p.doc_string)
    return docs


def _declared_tensor(vi: onnx.ValueInfoProto) -> tuple[np.dtype | None, list | None]:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return None, None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
        if tt.HasField("shape") else None
    return dtype, shape


def _apply_declared_io(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """Give main-graph inputs/outputs the dtype and shape they declare where gs lost them: gs imports a
    graph output from a `value_info` entry of the same name first, and one without a shape wins."""
    inits = {t.name for t in g.initializer}
    declared = [vi for vi in g.input if vi.name not in inits] + list(g.output)
    for t, vi in zip(list(graph.inputs) + list(graph.outputs), declared):
        if not isinstance(t, gs.Variable) or t.name != vi.name:
            continue
        dtype, shape = _declared_tensor(vi)
        if t.dtype is None and dtype is not None:
            t.dtype = dtype
        if t.shape is None and shape is not None:
            t.shape = shape


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
    return {vi.name: vi.type for cur in all_graph_protos(g) for vi in list(cur.input) + list(cur.output)
            if vi.type.WhichOneof("value") not in (None, *_GS_TYPES)}


#: gs drops TYPE_PROTO attributes (e.g. `Optional <type=...>`); they travel through it as base64 strings under this prefix.
_TYPE_ATTR_PREFIX = "_onnxopt_type_proto:"


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


#: Other attribute types gs drops, stashed the same way: SPARSE_TENSOR (`Constant <sparse_value=...>`).
_SPARSE_ATTR_PREFIX = "_onnxopt_sparse_tensor:"
_STASHED = {onnx.AttributeProto.TYPE_PROTO: (_TYPE_ATTR_PREFIX, "tp", onnx.TypeProto),
            onnx.AttributeProto.SPARSE_TENSOR: (_SPARSE_ATTR_PREFIX, "sparse_tensor", onnx.SparseTensorProto)}


def _stash_type_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, or a copy whose TYPE_PROTO and SPARSE_TENSOR attributes are base64 strings gs keeps
    (undone on export)."""
    if not any(a.type in _STASHED for g in all_graph_protos(model.graph) for n in g.node for a in n.attribute):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for g in all_graph_protos(copy.graph):
        for node in g.node:
            for a in node.attribute:
                if a.type in _STASHED:
                    prefix, field, _ = _STASHED[a.type]
                    encoded = base64.b64encode(getattr(a, field).SerializeToString()).decode()
                    a.CopyFrom(onnx.helper.make_attribute(prefix + a.name, encoded))
    return copy


def _unstash_type_attributes(g: onnx.GraphProto) -> None:
    for cur in all_graph_protos(g):
        for node in cur.node:
            for a in node.attribute:
                for prefix, _, cls in _STASHED.values():
                    if a.name.startswith(prefix):
                        value = cls()
                        value.ParseFromString(base64.b64decode(a.s))
                        a.CopyFrom(onnx.helper.make_attribute(a.name[len(prefix):], value))


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
    _restore_declared_io(g, getattr(graph, "_onnxopt_declared_io", {}))
    docs = getattr(graph, "_onnxopt_node_docs", {})
    if docs:
        for cur in all_graph_protos(g):
            for node in cur.node:
                if not node.doc_string and node.name in docs:
                    node.doc_string = docs[node.name]


def _restore_declared_io(g: onnx.GraphProto, declared: dict[str, onnx.ValueInfoProto]) -> None:
    """Main-graph inputs/outputs keep what gs cannot write: a sequence's or optional's element shape, a
    declared shape or dtype a rewrite left unknown, doc strings. What a pass refined stays refined."""
    for vi in list(g.input) + list(g.output):
        d = declared.get(vi.name)
        if d is None:
            continue
        if not vi.doc_string and d.doc_string:
            vi.doc_string = d.doc_string
        kind = d.type.WhichOneof("value")
        if kind in ("sequence_type", "optional_type") and vi.type.WhichOneof("value") == kind:
            vi.type.CopyFrom(d.type)
        elif kind == "tensor_type" and vi.type.WhichOneof("value") in (None, "tensor_type"):
            tt, dt = vi.type.tensor_type, d.type.tensor_type
            if not tt.elem_type and dt.elem_type:
                tt.elem_type = dt.elem_type
            if not tt.HasField("shape") and dt.HasField("shape") and tt.elem_type == dt.elem_type:
                tt.shape.CopyFrom(dt.shape)


def _restore_io_types(g: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    for cur in all_graph_protos(g):
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
    shared = _shared_outer_constants(graph)
    with _gs_exportable(graph), _hidden_constants(shared):
        model = gs.export_onnx(graph, do_type_check=False)
    _drop_value_info(model.graph, {t.name for t in shared})
    _drop_outer_value_info(model.graph)
    for t in shared:
        _write_constant(model.graph.initializer.add(), t, graph)
    _write_overridable_defaults(graph, model.graph)
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
    main = {id(t) for t in consts}
    main_names = {t.name for t in consts}
    consts += [t for t in _shared_outer_constants(graph) if id(t) not in main]
    values = {id(t): t._values for t in consts}
    keep = {id(v.tensor) for t in consts for v in [values[id(t)]]
            if isinstance(v, LazyValues) and id(v.tensor) in owned and v.tensor.name == t.name}
    inputs = {t.name for t in graph.inputs}
    keep |= {id(p) for p in into.graph.initializer
             if p.name in getattr(graph, "_onnxopt_overridable", {}) and p.name in inputs and p.name not in main_names}
    with _hidden_constants(consts):  # hidden from gs, so it copies no weight
        model = _gs_export(graph)
    g = into.graph
    for i in range(len(g.initializer) - 1, -1, -1):
        if id(g.initializer[i]) not in keep:
            del g.initializer[i]
    names = {t.name for t in consts}
    _drop_value_info(model.graph, names)
    present = {p.name for p in g.initializer}  # overridable defaults still in place stay as they are
    g.initializer.extend(p for p in model.graph.initializer
                         if p.name in getattr(graph, "_onnxopt_overridable", {}) and p.name not in present)
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


def _shared_outer_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Constants read by nodes of more than one graph (main and a body, or both If branches).

    onnx-graphsurgeon writes a constant as an initializer of every graph whose nodes read it, so an
    outer-scope weight shared by two If branches would be copied into each (the file grows by the
    weight). These are written once, in the main graph, and the bodies keep outer-scope references.
    A name shared by distinct constants (local constants of sibling bodies) stays local.
    """
    users: dict[int, set[int]] = {}
    objs: dict[int, gs.Constant] = {}
    by_name: dict[str, set[int]] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    users.setdefault(id(t), set()).add(id(g))
                    objs[id(t)] = t
                    by_name.setdefault(t.name, set()).add(id(t))
    return [t for k, t in objs.items() if len(users[k]) > 1 and len(by_name[t.name]) == 1]


@contextlib.contextmanager
def _hidden_constants(consts: list[gs.Constant]) -> Iterator[None]:
    """The constants are typed variables while gs exports the graph (so it copies none of them)."""
    values = {id(t): t._values for t in consts}
    for t in consts:
        t.to_variable(dtype=t.dtype, shape=t.shape)
        t.type = "tensor_type"
    try:
        yield
    finally:
        for t in consts:
            t.to_constant(values[id(t)])


def _drop_value_info(g: onnx.GraphProto, names: set[str]) -> None:
    """Remove `value_info` entries of `names` (initializers hidden from gs) in the graph and its subgraphs."""
    if not names:
        return
    for cur in all_graph_protos(g):
        keep = [v for v in cur.value_info if v.name not in names]
        if len(keep) != len(cur.value_info):
            del cur.value_info[:]
            cur.value_info.extend(keep)


def _drop_outer_value_info(g: onnx.GraphProto) -> None:
    """Remove from every subgraph the `value_info` of tensors it does not define (outer-scope
    references, which gs describes again in each body that reads them: bytes for nothing)."""
    for cur in all_graph_protos(g):
        if cur is g:
            continue
        local = {o for n in cur.node for o in n.output} | {i.name for i in cur.input}
        keep = [v for v in cur.value_info if v.name in local]
        if len(keep) != len(cur.value_info):
            del cur.value_info[:]
            cur.value_info.extend(keep)


def _write_overridable_defaults(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """Write the default (initializer) of every overridable input that is still a graph input."""
    defaults = getattr(graph, "_onnxopt_overridable", {})
    present = {p.name for p in g.initializer}
    for vi in g.input:
        if vi.name in defaults and vi.name not in present:
            g.initializer.append(defaults[vi.name])


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


def _structure_nbytes(t: gs.Constant) -> int:
    """Bytes of a constant from its metadata (ONNX types numpy has no dtype for count one byte each)."""
    if t.shape is None:
        return 0
    try:
        itemsize = np.dtype(t.dtype).itemsize
    except TypeError:
        itemsize = 1
    return int(np.prod(t.shape, dtype=np.float64)) * itemsize


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
            nbytes = _structure_nbytes(t)
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
