"""`requantize=true`: onnxruntime's dynamic MatMulInteger layers turned back into float MatMuls.

onnxruntime's dynamic quantizer writes DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, wzp)
-> Cast -> Mul(xs * ws). Such a layer computes what a float MatMul with the dequantized weight
approximates, so the pass can recover that MatMul and quantize it again with calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.ir.ops import ops_where
from onnxopt.passes.quantize.proto_graphs import graph_constants, used_names


@dataclass
class _Links:
    """What the matching reads of one graph: its constants, each tensor's producer and readers."""

    consts: dict[str, onnx.TensorProto]
    producer: dict[str, onnx.NodeProto]
    users: dict[str, list[onnx.NodeProto]]

    @classmethod
    def of(cls, g: onnx.GraphProto) -> _Links:
        users: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for t in n.input:
                users.setdefault(t, []).append(n)
        return cls(graph_constants(g), {o: n for n in g.node for o in n.output}, users)


@dataclass
class _DynamicMatMul:
    """The nodes around one requantizable MatMulInteger and its weight scale (scalar or [1, cols])."""

    dql: onnx.NodeProto
    cast: onnx.NodeProto
    mul: onnx.NodeProto
    weight_scale: np.ndarray


def dequantize_dynamic_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[dict[str, str]]]:
    """A copy of `model` where each MatMulInteger that onnxruntime's dynamic quantizer wrote (main
    graph) is a float MatMul again, with its int8 weight dequantized: the pattern
    DynamicQuantizeLinear(x) -> MatMulInteger(xq, Wq, xzp, wzp) -> Cast -> Mul(xs * ws) becomes
    MatMul(x, (Wq - wzp) * ws), which computes what the integer layer approximated. Returns (model,
    names of the new MatMuls, why-not rows for the integer layers left as they are)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    links = _Links.of(g)
    integer_ops = ops_where("integer")
    drop, made, left = set(), [], []
    replace: dict[int, onnx.NodeProto] = {}
    for n in g.node:
        if n.op_type not in integer_ops:
            continue
        found = _match(n, links)
        if isinstance(found, str):
            left.append({"node": n.name, "op": n.op_type, "reason": f"not requantized: {found}"})
            continue
        name = f"{n.name}_requantized"
        g.initializer.append(numpy_helper.from_array(_float_weight(n, found, links.consts), name + "_W"))
        replace[id(found.mul)] = helper.make_node(
            "MatMul", [found.dql.input[0], name + "_W"], [found.mul.output[0]], name=name
        )
        drop.update({id(n), id(found.cast)})
        made.append(name)
    nodes = _without_dead_scaling([replace.get(id(n), n) for n in g.node if id(n) not in drop], g)
    del g.node[:]
    g.node.extend(nodes)
    used = used_names(nodes)
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return out, made, left


def _float_weight(n: onnx.NodeProto, found: _DynamicMatMul, consts: dict[str, onnx.TensorProto]) -> np.ndarray:
    """(Wq - wzp) * ws: the float weight the integer layer `n` approximated."""
    wq = numpy_helper.to_array(consts[n.input[1]]).astype(np.float32)
    wzp = numpy_helper.to_array(consts[n.input[3]]).astype(np.float32) if len(n.input) > 3 and n.input[3] else 0
    return ((wq - wzp) * found.weight_scale).astype(np.float32)


def _without_dead_scaling(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """`nodes` less the DynamicQuantizeLinear and scale products no layer reads any more."""
    while True:
        used = used_names(nodes) | {o.name for o in g.output}
        dead = [n for n in nodes if n.op_type in ("DynamicQuantizeLinear", "Mul") and not set(n.output) & used]
        if not dead:
            return nodes
        nodes = [n for n in nodes if n not in dead]


def _match(n: onnx.NodeProto, links: _Links) -> _DynamicMatMul | str:
    """The requantizable dynamic MatMul around integer layer `n`, or why it is not one."""
    if n.op_type != "MatMulInteger":
        return f"only MatMulInteger fed by DynamicQuantizeLinear is turned back to float ({n.op_type} is not)"
    dql = links.producer.get(n.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or len(n.input) < 3 or n.input[2] != dql.output[2]:
        return "its input is not quantized by DynamicQuantizeLinear"
    why = _weight_problem(n, links.consts)
    if why:
        return why
    scaled = _scaled_output(n, links)
    if isinstance(scaled, str):
        return scaled
    cast, mul = scaled
    ws = _weight_scale(n, dql, cast, mul, links)
    if isinstance(ws, str):
        return ws
    return _DynamicMatMul(dql, cast, mul, ws)


def _weight_problem(n: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> str | None:
    """Why the weight of MatMulInteger `n` cannot be dequantized (None: it can)."""
    if n.input[1] not in consts or (len(n.input) > 3 and n.input[3] and n.input[3] not in consts):
        return "its weight or weight zero point is not a constant"
    if len(consts[n.input[1]].dims) != 2:
        return "its weight is not 2-D"
    return None


def _scaled_output(n: onnx.NodeProto, links: _Links) -> tuple[onnx.NodeProto, onnx.NodeProto] | str:
    """The Cast and the Mul that alone turn `n`'s integer output into float, or why there are none."""
    readers = links.users.get(n.output[0], [])
    cast = readers[0] if len(readers) == 1 else None
    if cast is None or cast.op_type != "Cast":
        return "its output is not cast to float alone"
    muls = links.users.get(cast.output[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        return "its output is not scaled by one Mul"
    return cast, muls[0]


def _weight_scale(
    n: onnx.NodeProto, dql: onnx.NodeProto, cast: onnx.NodeProto, mul: onnx.NodeProto, links: _Links
) -> np.ndarray | str:
    """The weight scale of the output Mul (input scale x weight scale), scalar or [1, cols], or why not."""
    sm = links.producer.get(mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0])
    if sm is None or sm.op_type != "Mul" or dql.output[1] not in sm.input:
        return "its output scale is not the input scale times a weight scale"
    ws_name = sm.input[1] if sm.input[0] == dql.output[1] else sm.input[0]
    if ws_name not in links.consts:
        return "its weight scale is not a constant"
    ws = numpy_helper.to_array(links.consts[ws_name]).astype(np.float32)
    cols = links.consts[n.input[1]].dims[1]
    if ws.size not in (1, cols):
        return "its weight scale is neither per tensor nor per column"
    return ws.reshape(()) if ws.size == 1 else ws.reshape(1, cols)
