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

#: Recurrent ops and their weight inputs (W, R): int8 storage only, since onnxruntime's CPU EP has no
#: QDQ fusion for them (its DynamicQuantizeLSTM is a contrib op of its own quantizer).
RECURRENT_OPS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}

#: Ops that already compute in integers (what onnxruntime's dynamic and static quantizers write).
INTEGER_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QLinearConv", "QLinearMatMul", "QGemm",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QLinearConvTranspose")

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
    return list(_optimized_graph(model, threads).node)


def _optimized_graph(model: onnx.ModelProto, threads: int = 2) -> onnx.GraphProto:
    """onnxruntime's optimized CPU-EP main graph of `model` (subgraphs inside its If/Loop/Scan nodes)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-opt-") as d:
        path = os.path.join(d, "optimized.onnx")
        so = session_options(threads, optimize=True)
        so.optimized_model_filepath = path
        # weights of a big model go to a file of their own, not into the optimized protobuf
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        make_session(model, so=so)
        opt = onnx.load(path, load_external_data=False)
    return opt.graph


def optimized_op_types(model: onnx.ModelProto, threads: int = 2, subgraphs: bool = False) -> list[str]:
    """Node types of onnxruntime's optimized CPU-EP graph of `model` (with `subgraphs`, those of the
    nodes inside its If/Loop/Scan bodies too)."""
    if not subgraphs:
        return [n.op_type for n in optimized_nodes(model, threads)]
    return [n.op_type for g, _, _ in walk_graphs(_optimized_graph(model, threads)) for n in g.node]


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every subgraph a node holds."""
    found = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            found.append((a.name, a.g))
        found += [(a.name, sub) for sub in a.graphs]
    return found


def walk_graphs(graph: onnx.GraphProto, where: str = "main graph"):
    """(graph, where, scopes) for `graph` and every subgraph below it, parents first: `where` names it
    ("If '/If' then_branch"), `scopes` lists the constants (initializers and Constant values by
    name) visible in it, innermost first, itself included."""
    stack = [(graph, where, [])]
    while stack:
        g, here, outer = stack.pop(0)
        scopes = [graph_constants(g)] + outer
        yield g, here, scopes
        for n in g.node:
            for attr, sub in _subgraphs(n):
                stack.append((sub, f"{n.op_type} '{n.name}' {attr}", scopes))


def graph_constants(g: onnx.GraphProto) -> dict[str, TensorProto]:
    """Constant tensors defined in `g` itself: initializers that are not graph inputs (those can be
    overridden at run time) and the values of Constant nodes."""
    inputs = {i.name for i in g.input}
    found = {t.name: t for t in g.initializer if t.name not in inputs}
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            found[n.output[0]] = n.attribute[0].t
    return found


def integer_layers(model: onnx.ModelProto) -> list[dict[str, str]]:
    """The layers of `model` (subgraphs included) that already compute in integers: INTEGER_OPS, and MAC
    layers whose weight comes from a DequantizeLinear of an integer tensor (QDQ form), as report rows
    {node, op, where}."""
    rows = []
    for g, where, _ in walk_graphs(model.graph):
        dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
        for n in g.node:
            if n.op_type in INTEGER_OPS:
                rows.append({"node": n.name, "op": n.op_type, "where": where})
            elif n.op_type in MAC_OPS and len(n.input) > 1 and n.input[1] in dq_out:
                rows.append({"node": n.name, "op": f"{n.op_type} (QDQ)", "where": where})
    return rows


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
            st = todo.pop(name)
            base = f"{name}_wstore"
            scale = np.asarray(st.weight_scale, np.float32)
            g.initializer.extend([numpy_helper.from_array(np.asarray(st.weight_q, np.int8), base + "_q"),
                                  numpy_helper.from_array(scale, base + "_s")])
            mul_out = base + "_w" if st.shape is not None else name
            head += [helper.make_node("Cast", [base + "_q"], [base + "_f"], name=base + "_Cast", to=TensorProto.FLOAT),
                     helper.make_node("Mul", [base + "_f", base + "_s"], [mul_out], name=base + "_Mul")]
            if st.shape is not None:
                g.initializer.append(numpy_helper.from_array(np.asarray(st.shape, np.int64), base + "_shape"))
                head.append(helper.make_node("Reshape", [mul_out, base + "_shape"], [name], name=base + "_Reshape"))
        kept_inits = [t for t in g.initializer if t.name not in here]
        kept_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in here)]
        del g.initializer[:]
        g.initializer.extend(kept_inits)
        del g.node[:]
        g.node.extend(head + kept_nodes)
    return out


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


def dequantize_dynamic_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[dict[str, str]]]:
    """A copy of `model` where each MatMulInteger that onnxruntime's dynamic quantizer wrote (main
    graph) is a float MatMul again, with its int8 weight dequantized: the pattern
    DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, wzp) -> Cast -> Mul(xs * ws) becomes
    MatMul(x, (Wq - wzp) * ws), which computes what the integer layer approximated. Returns (model,
    names of the new MatMuls, why-not rows for the integer layers left as they are)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = graph_constants(g)
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    drop, made, left = set(), [], []
    replace: dict[int, onnx.NodeProto] = {}
    for n in g.node:
        if n.op_type not in INTEGER_OPS:
            continue
        why = _dynamic_matmul_mismatch(n, consts, producer, users)
        if isinstance(why, str):
            left.append({"node": n.name, "op": n.op_type, "reason": f"not requantized: {why}"})
            continue
        dql, cast, mul, scale_mul, ws = why
        wq = numpy_helper.to_array(consts[n.input[1]]).astype(np.float32)
        wzp = numpy_helper.to_array(consts[n.input[3]]).astype(np.float32) if len(n.input) > 3 and n.input[3] else 0
        w = ((wq - wzp) * ws).astype(np.float32)
        name = f"{n.name}_requantized"
        g.initializer.append(numpy_helper.from_array(w, name + "_W"))
        replace[id(mul)] = helper.make_node("MatMul", [dql.input[0], name + "_W"], [mul.output[0]], name=name)
        drop.update({id(n), id(cast)})
        made.append(name)
    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    while True:  # DynamicQuantizeLinear and scale products no layer reads any more
        used = _used_names(nodes) | {o.name for o in g.output}
        dead = [n for n in nodes if n.op_type in ("DynamicQuantizeLinear", "Mul") and not set(n.output) & used]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del g.node[:]
    g.node.extend(nodes)
    used = _used_names(nodes)
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return out, made, left


def _dynamic_matmul_mismatch(n, consts, producer, users):
    """Why integer layer `n` is not a requantizable dynamic MatMul, or its (DynamicQuantizeLinear,
    Cast, output Mul, scale Mul, weight scale array)."""
    if n.op_type != "MatMulInteger":
        return f"only MatMulInteger fed by DynamicQuantizeLinear is turned back to float ({n.op_type} is not)"
    dql = producer.get(n.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or len(n.input) < 3 or n.input[2] != dql.output[2]:
        return "its input is not quantized by DynamicQuantizeLinear"
    if n.input[1] not in consts or (len(n.input) > 3 and n.input[3] and n.input[3] not in consts):
        return "its weight or weight zero point is not a constant"
    if len(consts[n.input[1]].dims) != 2:
        return "its weight is not 2-D"
    (cast,) = users.get(n.output[0], [None]) if len(users.get(n.output[0], [])) == 1 else (None,)
    if cast is None or cast.op_type != "Cast":
        return "its output is not cast to float alone"
    muls = users.get(cast.output[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        return "its output is not scaled by one Mul"
    mul = muls[0]
    sm = producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
    if sm is None or sm.op_type != "Mul" or dql.output[1] not in sm.input:
        return "its output scale is not the input scale times a weight scale"
    ws_name = sm.input[1] if sm.input[0] == dql.output[1] else sm.input[0]
    if ws_name not in consts:
        return "its weight scale is not a constant"
    ws = numpy_helper.to_array(consts[ws_name]).astype(np.float32)
    cols = consts[n.input[1]].dims[1]
    if ws.size not in (1, cols):
        return "its weight scale is neither per tensor nor per column"
    return dql, cast, mul, sm, ws.reshape(()) if ws.size == 1 else ws.reshape(1, cols)
