"""Analyses of the core that passes request through `ctx.analysis(name, graph)`."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo, infer_tensor_info
from onnxopt.framework.context import PassContext, register_analysis
from onnxopt.ir.graph import export_structure


@register_analysis("shapes")
def tensor_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, TensorInfo]:
    """Inferred dtype and shape of every tensor of the main graph, at the model's own input shapes."""
    return infer_tensor_info(export_structure(graph))
