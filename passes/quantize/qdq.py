"""QDQ rewriting of a ModelProto: QuantizeLinear/DequantizeLinear pairs on activations, int8 weights.

The quantize pass decides *what* to quantize; this module writes it the way
onnxruntime's CPU EP recognizes (DQ -> op -> Q node groups that its QDQ
transformers turn into QLinearConv, QLinearMatMul/MatMulIntegerToFloat,
QGemm...), writes int8 weight storage (Cast -> Mul that the runtime folds at
load), and builds one-layer models (float and QDQ forms of a layer) so the pass
can time them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir import weights
from onnxopt.ir.ops import facts
from onnxopt.passes.quantize.dynamic import DYNAMIC, dql_node, dynamic_int8_nodes, dynamic_layer_nodes
from onnxopt.passes.quantize.proto_graphs import graph_constants, used_names, walk_graphs


@dataclass
class ActParams:
    """Scale and zero point of one activation tensor."""

    scale: np.float32
    zero_point: np.integer


@dataclass
class LayerQuant:
    """A quantized MAC layer: int8 weight with per-channel (or per-tensor) scales, int32 bias."""

    node: str
    weight_q: np.ndarray
    weight_scale: np.ndarray
    weight_zp: np.ndarray
    axis: int | None
    bias_q: np.ndarray | None = None
    bias_scale: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    #: Stored weights only: the weight's shape when `weight_q` is in a blocked layout (one scale per
    #: block, `weight_scale` broadcasting against it), reshaped back after the Mul.
    shape: tuple[int, ...] | None = None
    #: "qdq" (static: calibrated Q/DQ around it) or "dynamic" (MatMul: its input quantized per run,
    #: `dynamic.py`); stored weights ignore it.
    form: str = "qdq"


def _array_init(name: str, value: np.ndarray | np.generic, spilling: bool = False) -> TensorProto:
    """An initializer for `value`; with `spilling` (big models staged on disk) a large one is
    written to the staging directory once instead of into every model built from it."""
    value = np.asarray(value)
    if spilling and value.nbytes >= weights.SPILL_BYTES:
        return weights.spill_once(value, name)
    return numpy_helper.from_array(value, name)


@dataclass
class _Additions:
    """What `apply_qdq` adds to a graph: nodes placed first (weight dequantization), new
    initializers in the order they are made, and the float weights they replace."""

    spilling: bool
    head: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[TensorProto] = field(default_factory=list)
    replaced: set[str] = field(default_factory=set)
    #: Dynamic layers: the nodes that replace a MatMul (by its name), the tensors they quantize.
    dynamic: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    dynamic_inputs: set[str] = field(default_factory=set)


def apply_qdq(
    model: onnx.ModelProto, acts: dict[str, ActParams], layers: list[LayerQuant], stored: Sequence[LayerQuant] = ()
) -> onnx.ModelProto:
    """A copy of `model` with Q->DQ on every tensor in `acts`, int8 weights for `layers` and int8
    storage for the float layers in `stored`.

    A layer's float weight and bias inputs are replaced by DequantizeLinear of
    the int8 weight and int32 bias (a float bias stays when `bias_q` is None).
    A stored layer keeps float compute: its weight becomes Cast(int8) -> Mul(scale)
    (-> Reshape when stored in blocks),
    which onnxruntime (and OpenVINO) fold back into a float constant when the
    session loads (DequantizeLinear would not be folded: onnxruntime keeps it
    for its QDQ fusions and would dequantize every run). Float constants left
    without a consumer are removed, so only int8 values and scales remain. Q/DQ nodes are
    placed right after the producer so the node list stays topologically
    sorted; every consumer of a quantized tensor reads the dequantized value,
    which lets onnxruntime fuse the producer with its Q.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    add = _Additions(weights.has_external(model))
    by_name = {n.name: n for n in g.node}
    for lq in layers:
        if lq.form == DYNAMIC:
            _dynamic(add, by_name[lq.node], lq)
        else:
            _int8_weight(add, by_name[lq.node], lq)
    for lq in stored:
        _stored_weight(add, by_name[lq.node], lq)
    nodes = _with_activation_qdq(g, acts, add)
    used = used_names(nodes) | {o.name for o in g.output}
    dead = add.replaced - used
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in dead)]
    kept_inits = [i for i in g.initializer if i.name not in dead]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits + add.inits)
    return out


def _int8_weight(add: _Additions, node: onnx.NodeProto, lq: LayerQuant) -> None:
    """`node` reads DequantizeLinear of its int8 weight (and of its int32 bias when `lq` has one)."""
    add.replaced.add(node.input[1])
    base = f"{lq.node}_w"
    add.inits += [
        _array_init(base + "_q", lq.weight_q, add.spilling),
        _array_init(base + "_s", lq.weight_scale),
        _array_init(base + "_zp", lq.weight_zp),
    ]
    attrs: dict[str, Any] = {"axis": lq.axis} if lq.axis is not None else {}
    add.head.append(
        helper.make_node(
            "DequantizeLinear",
            [base + "_q", base + "_s", base + "_zp"],
            [base + "_dq"],
            name=weight_dq_name(lq.node),
            **attrs,
        )
    )
    node.input[1] = base + "_dq"
    if lq.bias_q is not None:
        _int32_bias(add, node, lq)


def _dynamic(add: _Additions, node: onnx.NodeProto, lq: LayerQuant) -> None:
    """`node` becomes its dynamic form (`dynamic.py`) with the int8 weight of `lq`: a MatMul its
    MatMulInteger group, an op with a `dynamic_int8_op` (Attention) that op (QAttention)."""
    add.replaced.add(node.input[1])
    base = f"{lq.node}_w"
    names = [base + "_q", base + "_s", base + "_zp"]
    add.inits += [
        _array_init(names[0], lq.weight_q, add.spilling),
        _array_init(names[1], np.asarray(lq.weight_scale, np.float32)),
        _array_init(names[2], np.asarray(lq.weight_zp, np.int8)),
    ]
    int8_op = facts(node.op_type).dynamic_int8_op
    add.dynamic[node.name] = dynamic_int8_nodes(node, int8_op, names) if int8_op else dynamic_layer_nodes(node, names)
    add.dynamic_inputs.add(node.input[0])


def _int32_bias(add: _Additions, node: onnx.NodeProto, lq: LayerQuant) -> None:
    """`node` reads DequantizeLinear of its int32 bias (added as input 2 where it had none)."""
    bb = f"{lq.node}_b"
    assert lq.bias_q is not None and lq.bias_scale is not None  # the caller checks bias_q; its scale comes with it
    add.inits += [
        _array_init(bb + "_q", lq.bias_q),
        _array_init(bb + "_s", lq.bias_scale),
        _array_init(bb + "_zp", np.zeros(lq.bias_q.shape, np.int32) if lq.axis is not None else np.int32(0)),
    ]
    attrs: dict[str, Any] = {"axis": 0} if lq.axis is not None else {}
    add.head.append(
        helper.make_node(
            "DequantizeLinear",
            [bb + "_q", bb + "_s", bb + "_zp"],
            [bb + "_dq"],
            name=bb + "_DequantizeLinear",
            **attrs,
        )
    )
    if len(node.input) > 2:
        add.replaced.add(node.input[2])
        node.input[2] = bb + "_dq"
    else:
        node.input.append(bb + "_dq")


def _stored_weight(add: _Additions, node: onnx.NodeProto, lq: LayerQuant) -> None:
    """`node` keeps float compute and reads its weight as Cast(int8) -> Mul(scale) [-> Reshape]."""
    add.replaced.add(node.input[1])
    base = f"{lq.node}_wstore"
    scale = np.asarray(lq.weight_scale)
    if lq.axis is not None and lq.shape is None:
        shape = [1] * lq.weight_q.ndim
        shape[lq.axis] = -1
        scale = scale.reshape(shape)
    add.inits += [_array_init(base + "_q", lq.weight_q, add.spilling), _array_init(base + "_s", scale)]
    add.head += [
        helper.make_node(
            "Cast", [base + "_q"], [base + "_f"], name=base + "_Cast", to=helper.np_dtype_to_tensor_dtype(scale.dtype)
        ),
        helper.make_node("Mul", [base + "_f", base + "_s"], [base + "_w"], name=base + "_Mul"),
    ]
    if lq.shape is not None:
        add.inits.append(_array_init(base + "_shape", np.asarray(lq.shape, np.int64)))
        add.head.append(
            helper.make_node("Reshape", [base + "_w", base + "_shape"], [base + "_r"], name=base + "_Reshape")
        )
    node.input[1] = base + ("_r" if lq.shape is not None else "_w")


def _with_activation_qdq(g: onnx.GraphProto, acts: dict[str, ActParams], add: _Additions) -> list[onnx.NodeProto]:
    """The new node list: `add.head`, then the graph's nodes with Q -> DQ after each tensor of `acts`
    (graph inputs first) and every reader of such a tensor reading the DequantizeLinear output.

    A graph output keeps its name on the DequantizeLinear (the producer writes `<name>_float`),
    so the producer's only consumer is its Q and onnxruntime can fuse them."""
    graph_outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    renamed = {t: t + "_dq" for t in acts if t not in graph_outputs}

    def qdq(tensor: str, source: str, target: str) -> list[onnx.NodeProto]:
        p = acts[tensor]
        s, z = f"{tensor}_scale", f"{tensor}_zero_point"
        add.inits.extend([_array_init(s, np.float32(p.scale)), _array_init(z, p.zero_point)])
        return [
            helper.make_node("QuantizeLinear", [source, s, z], [tensor + "_q"], name=tensor + "_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [tensor + "_q", s, z], [target], name=tensor + "_DequantizeLinear"),
        ]

    nodes = list(add.head)
    nodes += [dql_node(t) for t in sorted(add.dynamic_inputs) if t in graph_inputs]
    for t in acts:
        if t in graph_inputs:
            nodes += qdq(t, t, renamed.get(t, t))
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
        nodes += add.dynamic.get(n.name, [n])
        for k, o in enumerate(n.output):
            if o in acts and o not in graph_inputs:
                nodes += _output_qdq(n, k, o in graph_outputs, qdq, renamed)
        nodes += [dql_node(o) for o in n.output if o in add.dynamic_inputs and o not in graph_inputs]
    return nodes


def _output_qdq(n: onnx.NodeProto, k: int, graph_output: bool, qdq, renamed: dict[str, str]) -> list[onnx.NodeProto]:
    """The Q -> DQ of output `k` of `n` (built by `qdq(tensor, source, target)`): a graph output keeps
    its name on the DequantizeLinear, its producer writing `<name>_float`."""
    o = n.output[k]
    if graph_output:
        n.output[k] = o + "_float"
        return qdq(o, o + "_float", o)
    return qdq(o, o, renamed[o])


def weight_dq_name(layer: str) -> str:
    """The name `apply_qdq` gives the DequantizeLinear of an int8-compute layer's weight."""
    return f"{layer}_w_DequantizeLinear"


@dataclass
class WeightStore:
    """Int8 storage of one float weight tensor, wherever it is defined (main graph or a body):
    `weight_q` times `weight_scale` (which broadcasts against it), reshaped to `shape` when given."""

    tensor: str
    weight_q: np.ndarray
    weight_scale: np.ndarray
    shape: tuple[int, ...] | None = None


def store_weights(model: onnx.ModelProto, stores: Sequence[WeightStore]) -> onnx.ModelProto:
    """A copy of `model` where each weight of `stores` is computed as Cast(int8) -> Mul(scale)
    [-> Reshape] by nodes placed first in the graph that defines it (main graph or an If/Loop/Scan
    body), under the weight's own name, so every reader, inside bodies too (outer-scope
    references), is unchanged. onnxruntime's constant folding turns them back into the float
    weight when the session loads; the caller checks that it does (`optimized_op_types` with
    `subgraphs`)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    todo = {s.tensor: s for s in stores}
    for g, _, _ in walk_graphs(out.graph):
        here = set(graph_constants(g)) & set(todo)
        if not here:
            continue
        head: list[onnx.NodeProto] = []
        for name in sorted(here):
            head += _store_one(g, todo.pop(name))
        kept_inits = [t for t in g.initializer if t.name not in here]
        kept_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in here)]
        del g.initializer[:]
        g.initializer.extend(kept_inits)
        del g.node[:]
        g.node.extend(head + kept_nodes)
    return out


def _store_one(g: onnx.GraphProto, st: WeightStore) -> list[onnx.NodeProto]:
    """The Cast -> Mul [-> Reshape] nodes that compute `st.tensor` from its int8 form; their
    initializers are appended to `g`."""
    name = st.tensor
    base = f"{name}_wstore"
    scale = np.asarray(st.weight_scale, np.float32)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(st.weight_q, np.int8), base + "_q"),
            numpy_helper.from_array(scale, base + "_s"),
        ]
    )
    mul_out = base + "_w" if st.shape is not None else name
    nodes = [
        helper.make_node("Cast", [base + "_q"], [base + "_f"], name=base + "_Cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [base + "_f", base + "_s"], [mul_out], name=base + "_Mul"),
    ]
    if st.shape is not None:
        g.initializer.append(numpy_helper.from_array(np.asarray(st.shape, np.int64), base + "_shape"))
        nodes.append(helper.make_node("Reshape", [mul_out, base + "_shape"], [name], name=base + "_Reshape"))
    return nodes


def single_layer_model(
    node: onnx.NodeProto,
    weights: dict[str, np.ndarray | onnx.TensorProto],
    input_shape: tuple[int, ...] | None,
    opset: int,
) -> onnx.ModelProto:
    """A float model holding only `node` with its constant weights, input `x` of `input_shape` (None:
    unknown), output `y`.

    A weight given as a TensorProto (one staged on disk, `onnxopt.weights`) is referenced, not copied.
    An optional input that is not among `weights` (an Attention's computed mask) is left out: the
    layer alone runs without it."""
    layer = onnx.NodeProto()
    layer.CopyFrom(node)
    layer.input[0] = "x"
    del layer.output[:]
    layer.output.append("y")
    inits = []
    for k in range(1, len(node.input)):
        if node.input[k] and node.input[k] not in weights:
            layer.input[k] = ""
        elif node.input[k]:
            name = f"w{k}"
            inits.append(_named_copy(weights[node.input[k]], name))
            layer.input[k] = name
    g = helper.make_graph(
        [layer],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    domains = [helper.make_opsetid("", max(opset, 13))]
    if node.domain not in ("", "ai.onnx"):
        domains.append(helper.make_opsetid(node.domain, 1))
    model = helper.make_model(g, opset_imports=domains)
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info} | {o.name: o for o in inferred.graph.output}
    if "y" in known and known["y"].type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(known["y"])
    return model


def _named_copy(w: np.ndarray | onnx.TensorProto, name: str) -> TensorProto:
    """An initializer `name` holding `w` (a TensorProto is copied as it is: a staged one stays a reference)."""
    if isinstance(w, onnx.TensorProto):
        t = onnx.TensorProto()
        t.CopyFrom(w)
        t.name = name
        return t
    return numpy_helper.from_array(w, name)
