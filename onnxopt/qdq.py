"""QDQ rewriting of a ModelProto: QuantizeLinear/DequantizeLinear pairs on activations, int8 weights.

The quantize pass decides *what* to quantize; this module writes it the way
onnxruntime's CPU EP recognizes (DQ -> op -> Q node groups that its QDQ
transformers turn into QLinearConv, QLinearMatMul/MatMulIntegerToFloat,
QGemm...). It also builds one-layer models (float and QDQ forms of a layer)
so the pass can time them, and reads back the node types of onnxruntime's
optimized graph to see which integer kernels were really chosen.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import weights
from onnxopt.runtime import make_session, session_options

#: Ops whose weight (input 1) and bias (input 2) are quantized, and the axis of a per-channel weight.
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Ops that only move or select values: their output reuses the input's scale (equal scales),
#: so onnxruntime can drop the Q/DQ around them and run them on integers.
PASS_THROUGH_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity")

#: Weights of fewer values stay float rather than int8-stored (two extra nodes cost more than the
#: bytes saved); a Cast of an (u)int8 constant at least this large to float is such storage.
INT8_STORAGE_MIN_ELEMENTS = 1024


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


def weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the weight of a MAC node (Conv 0, ConvTranspose 1, Gemm by transB, MatMul 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def reduction_axes(node: onnx.NodeProto, ndim: int) -> tuple[int, ...]:
    """Axes of the weight summed over by a MAC node (for the u8s8 saturation check)."""
    axis = weight_axis(node)
    if node.op_type in ("Conv", "ConvTranspose"):
        return tuple(a for a in range(ndim) if a != axis)
    return (1 - axis,)


def _array_init(name: str, value: np.ndarray, spilling: bool = False) -> TensorProto:
    """An initializer for `value`; with `spilling` (big models staged on disk) a large one is
    written to the staging directory once instead of into every model built from it."""
    value = np.asarray(value)
    if spilling and value.nbytes >= weights.SPILL_BYTES:
        return weights.spill_once(value, name)
    return numpy_helper.from_array(value, name)


def apply_qdq(model: onnx.ModelProto, acts: dict[str, ActParams], layers: list[LayerQuant],
              stored: Sequence[LayerQuant] = ()) -> onnx.ModelProto:
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
    spilling = weights.has_external(model)
    by_name = {n.name: n for n in g.node}
    head: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    replaced: set[str] = set()

    for lq in layers:
        node = by_name[lq.node]
        replaced.add(node.input[1])
        base = f"{lq.node}_w"
        new_inits += [_array_init(base + "_q", lq.weight_q, spilling), _array_init(base + "_s", lq.weight_scale),
                      _array_init(base + "_zp", lq.weight_zp)]
        attrs = {"axis": lq.axis} if lq.axis is not None else {}
        head.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_s", base + "_zp"], [base + "_dq"],
                                     name=weight_dq_name(lq.node), **attrs))
        node.input[1] = base + "_dq"
        if lq.bias_q is not None:
            bb = f"{lq.node}_b"
            new_inits += [_array_init(bb + "_q", lq.bias_q), _array_init(bb + "_s", lq.bias_scale),
                          _array_init(bb + "_zp", np.zeros(lq.bias_q.shape, np.int32)
                                      if lq.axis is not None else np.int32(0))]
            head.append(helper.make_node("DequantizeLinear", [bb + "_q", bb + "_s", bb + "_zp"], [bb + "_dq"],
                                         name=bb + "_DequantizeLinear", **({"axis": 0} if lq.axis is not None else {})))
            if len(node.input) > 2:
                replaced.add(node.input[2])
                node.input[2] = bb + "_dq"
            else:
                node.input.append(bb + "_dq")

    for lq in stored:
        node = by_name[lq.node]
        replaced.add(node.input[1])
        base = f"{lq.node}_wstore"
        scale = np.asarray(lq.weight_scale)
        if lq.axis is not None and lq.shape is None:
            shape = [1] * lq.weight_q.ndim
            shape[lq.axis] = -1
            scale = scale.reshape(shape)
        new_inits += [_array_init(base + "_q", lq.weight_q, spilling), _array_init(base + "_s", scale)]
        head += [helper.make_node("Cast", [base + "_q"], [base + "_f"], name=base + "_Cast",
                                  to=helper.np_dtype_to_tensor_dtype(scale.dtype)),
                 helper.make_node("Mul", [base + "_f", base + "_s"], [base + "_w"], name=base + "_Mul")]
        if lq.shape is not None:
            new_inits.append(_array_init(base + "_shape", np.asarray(lq.shape, np.int64)))
            head.append(helper.make_node("Reshape", [base + "_w", base + "_shape"], [base + "_r"],
                                         name=base + "_Reshape"))
        node.input[1] = base + ("_r" if lq.shape is not None else "_w")

    graph_outputs = {o.name for o in g.output}

    def qdq(tensor: str, source: str, target: str) -> list[onnx.NodeProto]:
        p = acts[tensor]
        s, z = f"{tensor}_scale", f"{tensor}_zero_point"
        new_inits.extend([_array_init(s, np.float32(p.scale)), _array_init(z, p.zero_point)])
        return [helper.make_node("QuantizeLinear", [source, s, z], [tensor + "_q"], name=tensor + "_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [tensor + "_q", s, z], [target],
                                 name=tensor + "_DequantizeLinear")]

    # A graph output keeps its name on the DequantizeLinear (the producer writes `<name>_float`),
    # so the producer's only consumer is its Q and onnxruntime can fuse them.
    renamed = {t: t + "_dq" for t in acts if t not in graph_outputs}
    graph_inputs = {i.name for i in g.input}
    nodes = list(head)
    for t in acts:
        if t in graph_inputs:
            nodes += qdq(t, t, renamed.get(t, t))
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
        nodes.append(n)
        for k, o in enumerate(n.output):
            if o in acts and o not in graph_inputs:
                if o in graph_outputs:
                    n.output[k] = o + "_float"
                    nodes += qdq(o, o + "_float", o)
                else:
                    nodes += qdq(o, o, renamed[o])
    used = _used_names(nodes) | graph_outputs
    dead = replaced - used
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output[0] in dead)]
    kept_inits = [i for i in g.initializer if i.name not in dead]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    return out


def _used_names(nodes) -> set[str]:
    """Every tensor name read by `nodes`, including reads from inside their subgraphs (If/Loop bodies)."""
    used: set[str] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        used.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                stack.extend(sub.node)
    return used


def optimized_nodes(model: onnx.ModelProto, threads: int = 2) -> list[onnx.NodeProto]:
    """The nodes of onnxruntime's optimized CPU-EP graph of `model` (a node that survives keeps its name)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-opt-") as d:
        path = os.path.join(d, "optimized.onnx")
        so = session_options(threads, optimize=True)
        so.optimized_model_filepath = path
        # weights of a big model go to a file of their own, not into the optimized protobuf
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        make_session(model, so=so)
        opt = onnx.load(path, load_external_data=False)
    return list(opt.graph.node)


def optimized_op_types(model: onnx.ModelProto, threads: int = 2) -> list[str]:
    """Node types of onnxruntime's optimized CPU-EP graph of `model`."""
    return [n.op_type for n in optimized_nodes(model, threads)]


def weight_dq_name(layer: str) -> str:
    """The name `apply_qdq` gives the DequantizeLinear of an int8-compute layer's weight."""
    return f"{layer}_w_DequantizeLinear"


def single_layer_model(node: onnx.NodeProto, weights: dict[str, np.ndarray | onnx.TensorProto],
                       input_shape: tuple[int, ...] | None, opset: int) -> onnx.ModelProto:
    """A float model holding only `node` with its constant weights, input `x` of `input_shape` (None:
    unknown), output `y`.

    A weight given as a TensorProto (one staged on disk, `onnxopt.weights`) is referenced, not copied."""
    layer = onnx.NodeProto()
    layer.CopyFrom(node)
    layer.input[0] = "x"
    del layer.output[:]
    layer.output.append("y")
    inits = []
    for k in range(1, len(node.input)):
        if node.input[k]:
            name = f"w{k}"
            w = weights[node.input[k]]
            if isinstance(w, onnx.TensorProto):
                t = onnx.TensorProto()
                t.CopyFrom(w)
                t.name = name
                inits.append(t)
            else:
                inits.append(numpy_helper.from_array(w, name))
            layer.input[k] = name
    g = helper.make_graph([layer], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", max(opset, 13))])
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in inferred.graph.value_info} | {o.name: o for o in inferred.graph.output}
    if "y" in known and known["y"].type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(known["y"])
    return model
