"""Model statistics for reports: nodes per op type, parameters, bytes, MACs, subgraphs included.

Nodes, op counts, parameters and MACs cover every graph of the model: the main
graph and the bodies of If/Loop/Scan nodes (`main_graph_nodes` counts the main
graph alone). MACs are computed from shapes inferred at concrete input shapes
(dynamic axes pinned, see `concrete_input_shapes`), with one formula per kind of
op in `MAC_FORMULAS`: float and integer/quantized convolutions and matrix
products, and recurrent layers (per step, times the sequence length). A Loop
body counts once per iteration when the trip count is a constant (else once, see
`loops_counted_once`), a Scan body once per scanned element, an If its costlier
branch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.analysis.shapes import (
    TensorInfo,
    concrete_input_shapes,
    constant_info,
    declared_info,
    inferred_model,
    tensor_dims,
)
from onnxopt.ir.constants import all_constants, constant_elements, constant_nbytes
from onnxopt.ir.ops import MAC_FORMULAS, Shape, known_size, recurrent_macs
from onnxopt.ir.traversal import all_graph_protos, subgraph_protos


@dataclass
class ModelStats:
    """Size and cost figures of one model (every graph: main graph and control-flow bodies)."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    weight_bytes: int
    macs: int
    macs_by_node: dict[str, int] = field(default_factory=dict)
    #: MAC nodes whose MACs could not be counted (shapes not inferable, e.g. before folding).
    macs_uncounted: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Nodes of the main graph alone (`nodes` counts the If/Loop/Scan bodies too).
    main_graph_nodes: int = 0
    #: Loop nodes whose trip count is not a constant: their body's MACs are counted once.
    loops_counted_once: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("macs_by_node")
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return d


def _tensor_elems_bytes(t: onnx.TensorProto) -> tuple[int, int]:
    n = int(np.prod(t.dims)) if t.dims else 1
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except KeyError:  # an element type this onnx has no numpy dtype for: a byte each
        item = 1
    return n, n * item


def node_macs(node: onnx.NodeProto, info: dict[str, TensorInfo]) -> int | None:
    """Multiply-accumulates of one node of `MAC_FORMULAS`, None if its shapes are unknown (0 for other ops)."""
    if node.op_type not in MAC_FORMULAS:
        return None
    formula, xi, wi = MAC_FORMULAS[node.op_type]

    def shape(i: int) -> Shape | None:
        if i >= len(node.input) or not node.input[i] or node.input[i] not in info:
            return None
        return info[node.input[i]].shape

    y = info[node.output[0]].shape if node.output and node.output[0] in info else None
    if formula is recurrent_macs:
        return recurrent_macs(shape(xi), shape(wi), y, node, shape(2))
    return formula(shape(xi), shape(wi), y, node)


def _scope_info(
    g: onnx.GraphProto, outer: dict[str, TensorInfo], symbols: dict[str, int] | None = None
) -> dict[str, TensorInfo]:
    """What is known of the tensors visible in graph `g`: its own, then those of the graphs around it.

    Named dimensions in `symbols` take its value: in ONNX one name is one size across
    the model, so a size the input shapes pin holds wherever the model wrote its name
    (e.g. in the declared outputs of an op shape inference does not know).
    """
    return {**outer, **declared_info(g, symbols), **constant_info(g)}


def _scope_ints(g: onnx.GraphProto, outer: dict[str, int]) -> dict[str, int]:
    """Scalar integer constants visible in `g` (Loop trip counts), by name."""
    out = dict(outer)
    inputs = {i.name for i in g.input}
    tensors = [t for t in g.initializer if t.name not in inputs]
    tensors += [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    names = [t.name for t in g.initializer if t.name not in inputs]
    names += [n.output[0] for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for name, t in zip(names, tensors):
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and known_size(t.dims) == 1:
            out[name] = int(numpy_helper.to_array(t).reshape(-1)[0])
    return out


@dataclass
class _MacCount:
    total: int = 0
    by_node: dict[str, int] = field(default_factory=dict)
    uncounted: int = 0
    loops_once: int = 0


def _repeats(node: onnx.NodeProto, info: dict[str, TensorInfo], ints: dict[str, int]) -> int | None:
    """How often a Loop/Scan body runs per run of its node (None: unknown)."""
    if node.op_type == "Loop":
        return ints.get(node.input[0]) if node.input and node.input[0] else None
    if node.op_type == "Scan":
        attrs = {a.name: a for a in node.attribute}
        n_scan = attrs["num_scan_inputs"].i if "num_scan_inputs" in attrs else 0
        if not n_scan:
            return None
        first = node.input[len(node.input) - n_scan]
        axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0]
        shape = info[first].shape if first in info else None
        axis = axes[0] if axes else 0
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) else None
    return 1


def _count_macs(
    g: onnx.GraphProto,
    info: dict[str, TensorInfo],
    ints: dict[str, int],
    symbols: dict[str, int],
    prefix: str = "",
    times: int = 1,
) -> _MacCount:
    """MACs of graph `g` run `times` times, recursing into control-flow bodies."""
    info, ints = _scope_info(g, info, symbols), _scope_ints(g, ints)
    out = _MacCount()
    for k, node in enumerate(g.node):
        key = prefix + (node.name or f"{node.op_type}_{k}")
        if node.op_type in MAC_FORMULAS:
            m = node_macs(node, info)
            if m is None:
                out.uncounted += 1
            else:
                out.by_node[key] = int(m) * times
                out.total += int(m) * times
        subs = subgraph_protos(node)
        if not subs:
            continue
        reps = _repeats(node, info, ints)
        if reps is None:
            out.loops_once += node.op_type == "Loop"
            reps = 1
        parts = [_count_macs(s, info, ints, symbols, f"{key}/", times * reps) for s in subs]
        for p in parts:
            out.by_node.update(p.by_node)
            out.uncounted += p.uncounted
            out.loops_once += p.loops_once
        out.total += max(p.total for p in parts) if node.op_type == "If" else sum(p.total for p in parts)
    return out


def _gs_weights(graph: gs.Graph) -> tuple[int, int]:
    """(parameters, bytes) of a gs graph's constants (bodies and Constant-node values included), each once."""
    consts = all_constants(graph)
    return sum(constant_elements(t) for t in consts), sum(constant_nbytes(t) for t in consts)


def _proto_weights(g: onnx.GraphProto) -> tuple[int, int]:
    """(parameters, bytes) of the initializers and Constant values of every graph of a model."""
    params = nbytes = 0
    for cur in all_graph_protos(g):
        tensors = list(cur.initializer) + [
            a.t for n in cur.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        for t in tensors:
            n, b = _tensor_elems_bytes(t)
            params += n
            nbytes += b
    return params, nbytes


def _pinned_symbols(g: onnx.GraphProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Named input dimensions -> the size the concrete input shapes give them (a name pinned to two
    sizes is left out)."""
    found: dict[str, set[int]] = {}
    for inp in g.input:
        dims = tensor_dims(inp.type.tensor_type) if inp.type.HasField("tensor_type") else None
        if inp.name not in shapes or dims is None or len(dims) != len(shapes[inp.name]):
            continue
        for d, v in zip(dims, shapes[inp.name]):
            if isinstance(d, str):
                found.setdefault(d, set()).add(int(v))
    return {k: next(iter(v)) for k, v in found.items() if len(v) == 1}


def model_stats(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, weights_from: gs.Graph | None = None
) -> ModelStats:
    """Count nodes, parameters, weight bytes and MACs of `model`, control-flow bodies included.

    With `weights_from` (the gs graph `model` was exported from by
    `export_structure`), parameters and bytes are counted from that graph, and
    only its real inputs are reported.
    """
    g = model.graph
    ops: Counter[str] = Counter()
    for cur in all_graph_protos(g):
        ops.update(n.op_type for n in cur.node)
    params, nbytes = _gs_weights(weights_from) if weights_from is not None else _proto_weights(g)
    tensor_inputs = {i.name for i in g.input if i.type.WhichOneof("value") in (None, "tensor_type")}
    shapes = {k: v for k, v in concrete_input_shapes(model, input_shapes).items() if k in tensor_inputs}
    count = _MacCount()
    if any(op in ops for op in MAC_FORMULAS):
        inferred = inferred_model(model, shapes)
        count = _count_macs(inferred.graph, {}, {}, _pinned_symbols(g, shapes))
    if weights_from is not None:
        real = {t.name for t in weights_from.inputs}
        shapes = {k: v for k, v in shapes.items() if k in real}
    return ModelStats(
        nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())),
        parameters=params,
        weight_bytes=nbytes,
        macs=count.total,
        macs_by_node=count.by_node,
        macs_uncounted=count.uncounted,
        input_shapes=shapes,
        main_graph_nodes=len(g.node),
        loops_counted_once=count.loops_once,
    )
