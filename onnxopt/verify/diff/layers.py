"""One model holding the layers of a chunk side by side, to measure each layer's own error.

Each layer (`matching.Layer`) is copied from the candidate with its inner
tensors renamed under a prefix of its own, so the layers share nothing but
their inputs (the tensors they read from outside, fed with the reference's
values) and their weights (shared by name, read-only). One session then gives
every layer of the chunk its output computed from exact inputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt.verify.diff.matching import Layer


def layer_output(k: int, name: str) -> str:
    """The name of layer `k`'s copy of candidate tensor `name` in the chunk model."""
    return f"diff{k}::{name}"


def chunk_layers_model(
    cand: onnx.ModelProto, layers: dict[int, Layer], targets: dict[int, str], dtypes: dict[str, tuple[np.dtype, int]]
) -> onnx.ModelProto:
    """A model computing, for each layer `k`, `layer_output(k, targets[k])` from the layers' frontier tensors.

    `dtypes`: the dtype and rank of every frontier tensor (from the values it will be fed), which
    become the model's inputs with dynamic dimensions.
    """
    g = cand.graph
    inits = {t.name: t for t in g.initializer}
    nodes: list[onnx.NodeProto] = []
    used_inits: dict[str, onnx.TensorProto] = {}
    frontier: dict[str, None] = {}
    for k, layer in layers.items():
        outside = set(layer.frontier) | set(layer.initializers)
        for i in layer.nodes:
            src = g.node[i]
            node = onnx.NodeProto()
            node.CopyFrom(src)
            node.name = layer_output(k, src.name or f"node{i}")
            node.input[:] = [n if (not n or n in outside) else layer_output(k, n) for n in src.input]
            node.output[:] = [layer_output(k, n) if n else n for n in src.output]
            nodes.append(node)
        frontier.update(dict.fromkeys(layer.frontier))
        used_inits.update({n: inits[n] for n in layer.initializers})
    inputs = [_input_info(name, *dtypes[name]) for name in frontier]
    outputs = [onnx.ValueInfoProto(name=layer_output(k, targets[k])) for k in layers]
    graph = onnx.helper.make_graph(nodes, "diff_layers", inputs, outputs, list(used_inits.values()))
    model = onnx.helper.make_model(graph, opset_imports=list(cand.opset_import), ir_version=cand.ir_version)
    model.functions.extend(cand.functions)
    return model


def _input_info(name: str, dtype: np.dtype, rank: int) -> onnx.ValueInfoProto:
    """An input of the given dtype and rank whose dimensions are all symbolic."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return onnx.helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(rank)])
