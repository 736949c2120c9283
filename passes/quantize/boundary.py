"""The one place where the quantize pass crosses between the gs graph and a ModelProto.

The pass manager hands every pass a gs.Graph; the quantize pass works on a
ModelProto instead, because almost all of its work is building and running
variant models: every latency measurement, sensitivity trial and bisection step
is a whole model that must be serialized for onnxruntime anyway, and the
sensitivity trials run in worker processes (or on Ray) that receive protos
(`Executor.share`) and rebuild each trial from the float proto. Editing
NodeProtos and copying the float proto is cheap and exact; a gs round trip per
trial would not be.

So the pass exports the graph once (`to_proto`), does all its work on protos
(`qdq`, `sensitivity`, ...), and writes the chosen model back once
(`write_back`). Nothing else in the package converts between the two IRs.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import export_model, import_model


def to_proto(graph: gs.Graph) -> onnx.ModelProto:
    """The ModelProto the pass works on: `graph` exported (topologically sorted, model-level fields,
    bodies, staged weights and declared signature kept as `export_model` keeps them)."""
    return export_model(graph)


def write_back(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Make `graph` hold `model`: its nodes, inputs, outputs, opset and imported domains (the opset
    may have been upgraded to 13 for per-channel weights); the graph's other fields stay."""
    new = import_model(model)
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset, graph.import_domains = new.opset, new.import_domains
