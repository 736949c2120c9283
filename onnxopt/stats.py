"""Model statistics for reports: nodes per op type, parameters, bytes, MACs.

MACs are counted for Conv, ConvTranspose, Gemm and MatMul from inferred shapes
at concrete input shapes (dynamic axes pinned, see `concrete_input_shapes`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.shapes import TensorInfo, concrete_input_shapes, infer_tensor_info

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ModelStats:
    """Size and cost figures of one model."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    weight_bytes: int
    macs: int
    macs_by_node: dict[str, int] = field(default_factory=dict)
    #: Conv/Gemm/MatMul nodes whose MACs could not be counted (shapes not inferable, e.g. before folding).
    macs_uncounted: int = 0
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("macs_by_node")
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return d


def _tensor_elems_bytes(t: onnx.TensorProto) -> tuple[int, int]:
    n = int(np.prod(t.dims)) if t.dims else 1
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        item = 1
    return n, n * item


def _prod(dims) -> int | None:
    out = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        out *= d
    return out


def node_macs(node: onnx.NodeProto, info: dict[str, TensorInfo]) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul node, None if shapes are unknown."""
    def shape(i: int):
        if i >= len(node.input) or not node.input[i] or node.input[i] not in info:
            return None
        return info[node.input[i]].shape

    out = info.get(node.output[0]).shape if node.output and node.output[0] in info else None
    if node.op_type == "Conv":
        w, y = shape(1), out
        if w is None or y is None:
            return None
        return _prod(y) and _prod(w[1:]) and _prod(y) * _prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        return _prod(x) and _prod(w[1:]) and _prod(x) * _prod(w[1:])
    if node.op_type in ("Gemm", "MatMul"):
        a, y = shape(0), out
        if a is None or y is None or not a:
            return None
        k = a[-1]
        if node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        py = _prod(y)
        return py * k if py is not None and isinstance(k, int) else None
    return None


def _gs_weights(graph: gs.Graph) -> tuple[int, int]:
    """(parameters, bytes) of a gs graph's constants, Constant-node values included."""
    consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    for node in graph.nodes:
        v = node.attrs.get("value") if node.op == "Constant" else None
        if isinstance(v, gs.Constant):
            consts[f"{node.name}/value"] = v
    params = nbytes = 0
    for t in consts.values():
        n = int(np.prod(t.shape)) if t.shape is not None else 0
        params += n
        nbytes += n * np.dtype(t.dtype).itemsize
    return params, nbytes


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                weights_from: gs.Graph | None = None) -> ModelStats:
    """Count nodes, parameters, weight bytes and MACs of `model` (main graph).

    With `weights_from` (the gs graph `model` was exported from by
    `export_structure`), parameters and bytes are counted from that graph, and
    only its real inputs are reported.
    """
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    params = nbytes = 0
    if weights_from is not None:
        params, nbytes = _gs_weights(weights_from)
    else:
        for init in g.initializer:
            n, b = _tensor_elems_bytes(init)
            params += n
            nbytes += b
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        n, b = _tensor_elems_bytes(a.t)
                        params += n
                        nbytes += b
    shapes = concrete_input_shapes(model, input_shapes)
    macs_by_node: dict[str, int] = {}
    uncounted = 0
    if any(op in ops for op in MAC_OPS):
        info = infer_tensor_info(model, shapes)
        for k, node in enumerate(g.node):
            if node.op_type in MAC_OPS:
                m = node_macs(node, info)
                if m is not None:
                    macs_by_node[node.name or f"{node.op_type}_{k}"] = int(m)
                else:
                    uncounted += 1
    if weights_from is not None:
        real = {t.name for t in weights_from.inputs}
        shapes = {k: v for k, v in shapes.items() if k in real}
    return ModelStats(nodes=len(g.node), ops=dict(sorted(ops.items())), parameters=params, weight_bytes=nbytes,
                      macs=sum(macs_by_node.values()), macs_by_node=macs_by_node, macs_uncounted=uncounted,
                      input_shapes=shapes)
