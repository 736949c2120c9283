"""The weights the weightonly pass can quantize: MatMul / Gemm layers with a constant 2-D float32
weight (`Layer`, y = x W with W the K x N matrix, Gemm's alpha and transB applied), and constant
Gather tables (`Table`); everything else is listed as skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, is_constant


@dataclass
class Layer:
    """One MatMul / Gemm whose weight becomes block-quantized: y = x W (+ bias)."""

    node: gs.Node
    x: gs.Tensor
    W: np.ndarray  # float64, K x N
    bias: np.ndarray | None = None  # Gemm's beta * C, when it has one
    in_shape: tuple[int, ...] = ()
    row: dict[str, Any] = field(default_factory=dict)
    #: The chosen form: "int4" | "int8" | "float", with the quantized weight of each tried form.
    form: str = "float"
    quants: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    awq_scale: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, int] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.W.shape[0])

    @property
    def n(self) -> int:
        return int(self.W.shape[1])


@dataclass
class Table:
    """A constant Gather table (rows x D, gathered on axis 0) stored block-quantized along D."""

    node: gs.Node
    values: np.ndarray  # float32, rows x D


def _skip(node: gs.Node, reason: str) -> dict[str, str]:
    return {"node": node.name, "op": node.op, "reason": reason}


def _weight(node: gs.Node, min_elements: int) -> tuple[np.ndarray | None, str]:
    """The float32 2-D weight of a MatMul/Gemm as K x N, or None and why not."""
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return None, "weight is not a constant"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None, "Gemm with transA=1"
    w = constant_value(node.inputs[1])
    if w is None or w.ndim != 2:
        return None, f"weight is not a 2-D matrix (rank {None if w is None else w.ndim})"
    if w.dtype != np.float32:
        return None, f"weight type {w.dtype} (float32 only)"
    if w.size < min_elements:
        return None, f"weight of {w.size} values (< min_elements={min_elements})"
    if not np.isfinite(w).all():
        return None, "weight holds inf/NaN"
    W = w.astype(np.float64)
    if node.op == "Gemm":
        W = (W.T if int(node.attrs.get("transB", 0)) else W) * float(node.attrs.get("alpha", 1.0))
    return W, ""


def _bias(node: gs.Node) -> tuple[np.ndarray | None, str]:
    """Gemm's beta * C as a length-N vector (None without C), or why it cannot be written as an Add."""
    if node.op != "Gemm" or len(node.inputs) < 3 or node.inputs[2].name == "":
        return None, ""
    c = constant_value(node.inputs[2]) if is_constant(node.inputs[2]) else None
    if c is None:
        return None, "Gemm bias C is not a constant"
    return c.astype(np.float64).reshape(-1) * float(node.attrs.get("beta", 1.0)), ""


def collect(graph: gs.Graph, min_elements: int, gather: bool) -> tuple[list[Layer], list[Table], list[dict]]:
    """The quantizable layers and tables of the main graph, and the rows of those left alone."""
    layers: list[Layer] = []
    tables: list[Table] = []
    skipped: list[dict] = []
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm"):
            W, why = _weight(node, min_elements)
            bias, why_b = _bias(node) if W is not None else (None, "")
            if W is None or why_b:
                skipped.append(_skip(node, why or why_b))
                continue
            if bias is not None and bias.size != W.shape[1]:
                skipped.append(_skip(node, "Gemm bias is not one value per output column"))
                continue
            layers.append(Layer(node, node.inputs[0], W, bias))
        elif node.op == "Gather" and gather and is_constant(node.inputs[0]):
            t = _table(node, min_elements)
            if isinstance(t, str):
                skipped.append(_skip(node, t))
            else:
                tables.append(t)
    return layers, tables, skipped


def _table(node: gs.Node, min_elements: int) -> Table | str:
    """A quantizable Gather table, or why not."""
    v = constant_value(node.inputs[0])
    if v is None or v.ndim != 2 or v.dtype != np.float32:
        return "table is not a 2-D float32 constant"
    if int(node.attrs.get("axis", 0)) != 0:
        return "Gather on axis 1"
    if v.size < min_elements:
        return f"table of {v.size} values (< min_elements={min_elements})"
    if not np.isfinite(v).all():
        return "table holds inf/NaN"
    return Table(node, v)
