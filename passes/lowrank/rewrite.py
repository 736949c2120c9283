"""The rewrite of the lowrank pass: a layer's factors at its chosen rank (whitened by its input
covariance with data, else a truncated SVD, with the bias corrected for the mean error), and the
graph edit that turns y = x W + b into y = (x A) B + b'.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, unique_name
from onnxopt.kernels.lowrank import truncated_svd, whitened_svd
from onnxopt.kernels.lowrank_budget import corrected_bias, relative_output_error
from onnxopt.passes.lowrank.layers import Layer
from onnxopt.passes.lowrank.statistics import InputStats, whitening_matrix

#: Attributes a 1x1 Conv keeps when it is split in two.
_CONV_KEPT_ATTRS = ("dilations", "kernel_shape")


def factor_layer(L: Layer, moments: dict[str, InputStats], whiten: bool, eps: float) -> None:
    """Compute the layer's factors at its chosen rank (and the corrected bias) into `L.factors`."""
    acc = moments[L.x.name].accs[L.layout] if whiten else None
    if acc is not None:
        A, B, _ = whitened_svd(L.W, whitening_matrix(L, acc), L.rank, eps)
    else:
        A, B = truncated_svd(L.W, L.rank)
    bias = L.bias if L.can_add_bias else None
    if acc is not None and L.can_add_bias:
        bias = corrected_bias(L.W, A, B, acc.mean(), L.bias)
    if acc is not None:
        L.row["exact_error"] = round(
            relative_output_error(
                L.W, A, B, acc.second_moment(), acc.mean(), L.bias, bias if L.can_add_bias else L.bias
            ),
            6,
        )
    L.factors = (A.astype(L.dtype), B.astype(L.dtype), bias)


def apply_layer(graph: gs.Graph, L: Layer) -> None:
    """Replace the layer (or each member of a shared group) by its two thinner products (`L.factors`)."""
    assert L.factors is not None, "factor_layer first"
    A, B, bias = L.factors
    base = L.node.name or L.node.outputs[0].name
    a_c = gs.Constant(unique_name(graph, f"{base}_lowrank_A"), A)
    h = gs.Variable(unique_name(graph, f"{base}_lowrank_h"), dtype=L.dtype)
    first_name = unique_name(graph, f"{base}_lowrank_0")
    if L.kind == "MatMul":
        first = gs.Node("MatMul", first_name, inputs=[L.x, a_c], outputs=[h])
    elif L.kind == "Gemm":
        first = gs.Node(
            "Gemm", first_name, attrs={"transA": int(L.node.attrs.get("transA", 0))}, inputs=[L.x, a_c], outputs=[h]
        )
    else:
        a_c.values = np.ascontiguousarray(A.T.reshape(L.rank, L.m, *L.spatial))
        keep = {k: v for k, v in L.node.attrs.items() if k in _CONV_KEPT_ATTRS}
        first = gs.Node("Conv", first_name, attrs=keep, inputs=[L.x, a_c], outputs=[h])
    graph.nodes.append(first)
    offset = 0
    for M in L.members or [L]:
        part = slice(offset, offset + M.n)
        offset += M.n
        _second_product(graph, M, h, B[:, part], None if bias is None else bias[part])


def _second_product(graph: gs.Graph, L: Layer, h: gs.Tensor, B: np.ndarray, bias: np.ndarray | None) -> None:
    """Turn L's node into h @ B with the (corrected) bias; bias None keeps the layer's own bias as is."""
    node = L.node
    base = node.name or node.outputs[0].name
    b_c = gs.Constant(unique_name(graph, f"{base}_lowrank_B"), np.ascontiguousarray(B))
    if L.kind == "MatMul":
        node.inputs[0] = h
        node.inputs[1] = b_c
        if L.bias_add is not None and bias is not None:
            _set_add_bias(graph, L, bias)
        return
    if L.kind == "Gemm":
        attrs, inputs = _second_gemm(graph, L, h, b_c, bias)
    else:
        b_c.values = np.ascontiguousarray(B.T.reshape(L.n, B.shape[0], *L.spatial))
        attrs = {k: v for k, v in node.attrs.items() if k in _CONV_KEPT_ATTRS}
        inputs = [h, b_c]
        if bias is not None:
            inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_bias"), bias.astype(L.dtype)))
    node.inputs.clear()
    node.inputs.extend(inputs)
    node.attrs.clear()
    node.attrs.update(attrs)


def _second_gemm(
    graph: gs.Graph, L: Layer, h: gs.Tensor, b_c: gs.Constant, bias: np.ndarray | None
) -> tuple[dict[str, Any], list[gs.Tensor]]:
    """Attributes and inputs of the second Gemm: h @ B plus the corrected bias, or the layer's own C."""
    node = L.node
    attrs: dict[str, Any] = {"alpha": 1.0, "transA": 0, "transB": 0}
    inputs = [h, b_c]
    if bias is not None:
        base = node.name or node.outputs[0].name
        inputs.append(gs.Constant(unique_name(graph, f"{base}_lowrank_C"), bias.astype(L.dtype)))
        attrs["beta"] = 1.0
    elif len(node.inputs) > 2:
        inputs.append(node.inputs[2])
        attrs["beta"] = float(node.attrs.get("beta", 1.0))
    return attrs, inputs


def _set_add_bias(graph: gs.Graph, L: Layer, bias: np.ndarray) -> None:
    """Write the corrected bias into the Add that holds a MatMul's bias."""
    add = L.bias_add
    assert add is not None  # the caller checks bias_add
    k = 1 if add.inputs[0] is L.node.outputs[0] else 0
    shape = np.asarray(constant_value(add.inputs[k])).shape
    add.inputs[k] = gs.Constant(unique_name(graph, f"{L.node.name}_lowrank_bias"), bias.reshape(shape).astype(L.dtype))
