"""`import_model`: a ModelProto into a gs.Graph, with what onnx-graphsurgeon would lose kept aside.

gs keeps only the graph: model-level fields, metadata, functions, declared optional/map types,
node doc strings and initializers that are also graph inputs would be lost or altered. They are
recorded in `onnxopt.ir.graph_state` and written back by `export_model`, so a round trip keeps
the model's signature. Staged external weights are memory-mapped, not read (`onnxopt.ir.weights`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir import weights
from onnxopt.ir.attr_stash import stash_attributes
from onnxopt.ir.graph_state import SourceModel, remember_source
from onnxopt.ir.gs_compat import EXPORTABLE_TYPES, lazy_tensor, map_staged
from onnxopt.ir.traversal import all_graph_protos, iter_graphs

#: Model-level fields restored on export (gs keeps only the graph).
KEEP_FIELDS = ("producer_name", "producer_version", "domain", "model_version", "doc_string")


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """Build a gs.Graph from a ModelProto, remembering what gs drops for `export_model`."""
    graph = gs.import_onnx(stash_attributes(model))
    mapped = _map_external_constants(graph)
    name_unnamed_nodes(graph)
    source = SourceModel(
        model_fields={f: getattr(model, f) for f in KEEP_FIELDS},
        metadata=[(p.key, p.value) for p in model.metadata_props],
        ir_version=model.ir_version,
        functions=list(model.functions),
        io_types=_unexportable_io_types(model.graph),
        declared_io={vi.name: _copied(vi) for vi in list(model.graph.input) + list(model.graph.output)},
        node_docs=_node_doc_strings(graph, model.graph),
        mapped=mapped,
    )
    _apply_declared_io(graph, model.graph)
    source.overridable = _keep_overridable_initializers(graph, model.graph, model.ir_version)
    remember_source(graph, source)
    return graph


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


def _keep_overridable_initializers(graph: gs.Graph, g: onnx.GraphProto, ir_version: int) -> dict[str, onnx.TensorProto]:
    """Initializers also listed as graph inputs are defaults the caller may override: gs drops them from
    the inputs and makes them constants, which would let passes bake them in. They stay graph inputs
    (variables, at their place in the signature); returns their defaults, written back on export.

    Below IR 4 every initializer had to be listed as an input, so the listing says nothing about the
    author's intent; onnxruntime treats them as constants there, and so do we."""
    inits = {t.name: t for t in g.initializer}
    overridable = [vi.name for vi in g.input if vi.name in inits] if ir_version >= 4 else []
    if not overridable:
        return {}
    tensors = graph.tensors()
    by_name = {t.name: t for t in graph.inputs}
    declared = {vi.name: vi for vi in g.input}
    for name in overridable:
        by_name[name] = _overridable_input(tensors.get(name) or gs.Variable(name), inits[name], declared[name])
    graph.inputs = [by_name[vi.name] for vi in g.input if vi.name in by_name]
    return {name: inits[name] for name in overridable}


def _overridable_input(t: gs.Tensor, init: onnx.TensorProto, vi: onnx.ValueInfoProto) -> gs.Variable:
    """`t` as a typed graph input: its default's dtype, its declared shape (which an override may fill
    differently), else the default's dims."""
    if isinstance(t, gs.Constant):
        t.to_variable()
    t.type = "tensor_type"
    try:
        t.dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    except KeyError:  # an element type onnx has no numpy dtype for: gs keeps the ONNX enum
        t.dtype = init.data_type
    shape = _declared_dims(vi.type.tensor_type)
    t.shape = shape if shape is not None else list(init.dims)
    return t


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


def _declared_dims(tt: onnx.TypeProto.Tensor) -> list[int | str | None] | None:
    """Declared dims in gs's form (int, symbolic name or None per axis), None without a shape."""
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _declared_tensor(vi: onnx.ValueInfoProto) -> tuple[np.dtype | None, list | None]:
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return None, None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
    return dtype, _declared_dims(tt)


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


def _map_external_constants(graph: gs.Graph) -> bool:
    """Make every constant whose tensor is staged on disk memory-map it; True if there was one."""
    found = False
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            proto = lazy_tensor(t) if isinstance(t, gs.Constant) else None
            if proto is not None and weights.is_external(proto):
                map_staged(t, proto)
                found = True
    return found


def _unexportable_io_types(g: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Declared types of the graph inputs/outputs (subgraphs included) that gs cannot write back."""
    return {
        vi.name: vi.type
        for cur in all_graph_protos(g)
        for vi in list(cur.input) + list(cur.output)
        if vi.type.WhichOneof("value") not in (None, *EXPORTABLE_TYPES)
    }
