"""`export_model`: a gs.Graph back into a ModelProto, with what onnx-graphsurgeon drops restored.

What `import_model` kept aside (`onnxopt.ir.graph_state.SourceModel`) is written back: model-level
fields, metadata, IR version, functions, declared optional/map types, node doc strings, the
defaults of overridable inputs. Weights are never held twice: exported into the proto the graph
came from, untouched initializers stay in place; constants shared by several graphs are written
once; in a graph whose weights are staged on disk, large new ones are spilled beside them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.attr_stash import unstash_attributes
from onnxopt.ir.constants import raw_array, spillable, stage_constant
from onnxopt.ir.graph_state import is_mapped, overridable_defaults, source_or_empty
from onnxopt.ir.gs_compat import EXPORTABLE_TYPES, LazyValues, export_tensor_proto, lazy_tensor, stored_values
from onnxopt.ir.traversal import all_graph_protos, iter_graphs, model_opsets, toposort

#: Model fields copied from the exported proto into the one exported into.
_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def export_model(graph: gs.Graph, sort: bool = True, into: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Turn the gs.Graph back into a ModelProto with the original model-level fields.

    With `into` (the proto the graph was imported from, which the caller gives up),
    the result is written into it: initializers the passes left untouched stay where
    they are instead of being copied, so big models are not held twice.
    """
    if sort:
        toposort(graph)
    if into is None and is_mapped(graph):
        into = onnx.ModelProto()  # weights staged on disk stay there; big new ones are spilled beside them
    if into is not None:
        return _export_into(graph, into)
    return _gs_export(graph)


def ir_version_for(graph: gs.Graph, original: int | None) -> int:
    """Lowest valid IR version: at least the original, at least 4 (initializers need not be inputs)."""
    try:
        needed = onnx.helper.find_min_ir_version_for(model_opsets(graph), ignore_unknown=True)
    except (ValueError, KeyError):  # an opset version this onnx does not know
        needed = 4
    return max(original or 0, needed, 4)


@contextlib.contextmanager
def gs_exportable(graph: gs.Graph) -> Iterator[None]:
    """Inputs/outputs of types gs cannot export (optional, map) are untyped while gs exports the graph."""
    types = source_or_empty(graph).io_types
    hidden = [
        (t, t.dtype)
        for g in iter_graphs(graph)
        for t in list(g.inputs) + list(g.outputs)
        if getattr(t, "type", "tensor_type") not in EXPORTABLE_TYPES and t.name in types
    ]
    for t, _ in hidden:
        t.dtype = None
    try:
        yield
    finally:
        for t, dtype in hidden:
            t.dtype = dtype


def finish_export(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """Undo what gs cannot carry: declared optional/map types, TYPE_PROTO attributes, node doc strings."""
    source = source_or_empty(graph)
    if source.io_types:
        _restore_io_types(g, source.io_types)
    unstash_attributes(g)
    _restore_declared_io(g, source.declared_io)
    docs = source.node_docs
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
            _restore_tensor_type(vi.type.tensor_type, d.type.tensor_type)


def _restore_tensor_type(tt: onnx.TypeProto.Tensor, declared: onnx.TypeProto.Tensor) -> None:
    """The declared element type where the export has none, and its shape where the export has none."""
    if not tt.elem_type and declared.elem_type:
        tt.elem_type = declared.elem_type
    if not tt.HasField("shape") and declared.HasField("shape") and tt.elem_type == declared.elem_type:
        tt.shape.CopyFrom(declared.shape)


def _restore_io_types(g: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> None:
    for cur in all_graph_protos(g):
        for vi in list(cur.input) + list(cur.output):
            if vi.name in types:
                vi.type.CopyFrom(types[vi.name])


def _gs_export(graph: gs.Graph) -> onnx.ModelProto:
    """onnx-graphsurgeon's export plus what it drops (model fields, metadata, IR version, functions)."""
    shared = _shared_outer_constants(graph)
    with gs_exportable(graph), _hidden_constants(shared):
        model = gs.export_onnx(graph, do_type_check=False)
    _drop_value_info(model.graph, {t.name for t in shared})
    _drop_outer_value_info(model.graph)
    for t in shared:
        write_constant(model.graph.initializer.add(), t, graph)
    _write_overridable_defaults(graph, model.graph)
    finish_export(graph, model.graph)
    _restore_model_fields(graph, model)
    return model


def _restore_model_fields(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Model-level fields, metadata, IR version and functions of the model `graph` was imported from."""
    source = source_or_empty(graph)
    for field, value in source.model_fields.items():
        setattr(model, field, value)
    del model.metadata_props[:]
    for key, value in source.metadata:
        model.metadata_props.add(key=key, value=value)
    model.ir_version = ir_version_for(graph, source.ir_version)
    if source.functions and not model.functions:
        model.functions.extend(source.functions)


def _export_into(graph: gs.Graph, into: onnx.ModelProto) -> onnx.ModelProto:
    """`export_model` into the source proto: untouched initializers stay in place, new ones are written once.

    onnx-graphsurgeon would copy every weight into a new proto (and protobuf copies
    again on append); here the main graph's constants are hidden from it, the
    source proto drops the initializers no longer used, then each new constant's
    bytes are written straight into it.
    """
    consts, main_names = _constants_to_write(graph)
    values = {id(t): stored_values(t) for t in consts}
    keep = _kept_initializers(graph, into.graph, consts, values, main_names)
    with _hidden_constants(consts):  # hidden from gs, so it copies no weight
        model = _gs_export(graph)
    g = into.graph
    for i in range(len(g.initializer) - 1, -1, -1):
        if id(g.initializer[i]) not in keep:
            del g.initializer[i]
    names = {t.name for t in consts}
    _drop_value_info(model.graph, names)
    present = {p.name for p in g.initializer}  # overridable defaults still in place stay as they are
    overridable = overridable_defaults(graph)
    g.initializer.extend(p for p in model.graph.initializer if p.name in overridable and p.name not in present)
    _replace_graph_body(g, model.graph, names)
    for t in consts:
        v = values[id(t)]
        if not (isinstance(v, LazyValues) and id(v.tensor) in keep):
            write_constant(g.initializer.add(), t, graph)
    _copy_model_level(model, into)
    return into


def _constants_to_write(graph: gs.Graph) -> tuple[list[gs.Constant], set[str]]:
    """The main graph's constants and those shared by several graphs; and the main graph's constant names."""
    consts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    main = {id(t) for t in consts}
    main_names = {t.name for t in consts}
    consts += [t for t in _shared_outer_constants(graph) if id(t) not in main]
    return consts, main_names


def _kept_initializers(
    graph: gs.Graph, g: onnx.GraphProto, consts: list[gs.Constant], values: dict[int, object], main_names: set[str]
) -> set[int]:
    """ids of the initializers of `g` that stay in place: those still-lazy constants hold under their
    own name, and the defaults of overridable inputs that are still graph inputs."""
    owned = {id(t) for t in g.initializer}
    keep = {
        id(v.tensor)
        for t in consts
        for v in [values[id(t)]]
        if isinstance(v, LazyValues) and id(v.tensor) in owned and v.tensor.name == t.name
    }
    inputs = {t.name for t in graph.inputs}
    overridable = overridable_defaults(graph)
    keep |= {id(p) for p in g.initializer if p.name in overridable and p.name in inputs and p.name not in main_names}
    return keep


def _replace_graph_body(g: onnx.GraphProto, exported: onnx.GraphProto, const_names: set[str]) -> None:
    """Nodes, inputs, outputs, value_info (but of the constants) and sparse initializers of `exported`."""
    for f in ("node", "input", "output", "value_info", "sparse_initializer"):
        del getattr(g, f)[:]
    g.node.extend(exported.node)
    g.input.extend(exported.input)
    g.output.extend(exported.output)
    g.value_info.extend(v for v in exported.value_info if v.name not in const_names)
    g.sparse_initializer.extend(exported.sparse_initializer)


def _copy_model_level(model: onnx.ModelProto, into: onnx.ModelProto) -> None:
    """Graph name and doc string, model fields, opsets, metadata and functions of `model`, into `into`."""
    into.graph.name, into.graph.doc_string = model.graph.name, model.graph.doc_string
    for f in _MODEL_FIELDS:
        setattr(into, f, getattr(model, f))
    for f in ("opset_import", "metadata_props", "functions"):
        del getattr(into, f)[:]
        getattr(into, f).extend(getattr(model, f))


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
        for t in (t for node in g.nodes for t in node.inputs if isinstance(t, gs.Constant)):
            users.setdefault(id(t), set()).add(id(g))
            objs[id(t)] = t
            by_name.setdefault(t.name, set()).add(id(t))
    return [t for k, t in objs.items() if len(users[k]) > 1 and len(by_name[t.name]) == 1]


@contextlib.contextmanager
def _hidden_constants(consts: list[gs.Constant]) -> Iterator[None]:
    """The constants are typed variables while gs exports the graph (so it copies none of them)."""
    values = {id(t): stored_values(t) for t in consts}
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
        _keep_value_info(cur, lambda v: v.name not in names)


def _drop_outer_value_info(g: onnx.GraphProto) -> None:
    """Remove from every subgraph the `value_info` of tensors it does not define (outer-scope
    references, which gs describes again in each body that reads them: bytes for nothing)."""
    for cur in all_graph_protos(g):
        if cur is g:
            continue
        local = {o for n in cur.node for o in n.output} | {i.name for i in cur.input}
        _keep_value_info(cur, lambda v, local=local: v.name in local)


def _keep_value_info(g: onnx.GraphProto, keep) -> None:
    """Keep only the `value_info` entries of `g` for which `keep(entry)` holds (untouched if all do)."""
    kept = [v for v in g.value_info if keep(v)]
    if len(kept) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(kept)


def _write_overridable_defaults(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """Write the default (initializer) of every overridable input that is still a graph input."""
    defaults = overridable_defaults(graph)
    present = {p.name for p in g.initializer}
    for vi in g.input:
        if vi.name in defaults and vi.name not in present:
            g.initializer.append(defaults[vi.name])


def write_constant(proto: onnx.TensorProto, t: gs.Constant, graph: gs.Graph) -> None:
    """Fill `proto` with constant `t` of `graph`: a still-lazy tensor is copied as stored (staged ones
    by reference); an array's bytes are copied once, or spilled to the staging directory when the
    graph's weights are staged there and it is large (`spillable`)."""
    lazy = lazy_tensor(t)
    if lazy is not None:
        proto.CopyFrom(lazy)
        proto.name = t.name
        return
    arr = raw_array(t)
    if arr is None:
        proto.CopyFrom(export_tensor_proto(t))
        return
    if spillable(graph, t):
        proto.CopyFrom(stage_constant(t))
        return
    proto.name = t.name
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    proto.dims.extend(arr.shape)
    proto.raw_data = np.ascontiguousarray(arr).tobytes()
