"""Weight-free views of a model, for inference, checks and statistics.

`light_copy` (alias `structure_only`) is a ModelProto without its large initializers, which
become typed graph inputs: what `onnx.checker` and shape inference need, built field by field so
no weight is copied (models over 2 GB included). `export_structure` is the same view of a gs.Graph.
Neither is a runnable model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_nbytes
from onnxopt.ir.exporter import finish_export, gs_exportable, ir_version_for
from onnxopt.ir.graph_state import source_or_empty
from onnxopt.ir.gs_compat import export_node, export_tensor_proto, export_value_info
from onnxopt.ir.traversal import model_opsets, toposort

#: Initializers above this many bytes are given as shapes only by `light_copy`.
LIGHT_MAX_INIT_BYTES = 1 << 16
#: Constants larger than this are exported as typed inputs by `export_structure`.
STRUCTURE_MAX_CONST_BYTES = 1 << 16


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its large initializers, which become typed inputs.

    Built field by field so the large weights are never copied (models over 2 GB included).
    The checker serializes the model and parses it again in C++; on the full model that would
    hold the weights two more times (and fail above 2 GB).
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, g = model.graph, light.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    existing_inputs = {i.name for i in src.input}
    for init in src.initializer:
        nbytes = len(init.raw_data) if init.HasField("raw_data") else 0
        if nbytes > LIGHT_MAX_INIT_BYTES or init.data_location == onnx.TensorProto.EXTERNAL:
            if init.name not in existing_inputs:
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)
    return light


#: The name model files use (`onnx.checker` gets the model without its weights).
structure_only = light_copy


def export_structure(graph: gs.Graph) -> onnx.ModelProto:
    """A ModelProto of the graph for shape inference and statistics, without large weights.

    Constants over `STRUCTURE_MAX_CONST_BYTES` become typed graph inputs, so no
    weight is copied (models over 2 GB included). Not a runnable model.
    """
    toposort(graph)
    with gs_exportable(graph):
        inputs, inits = _inputs_and_initializers(graph)
        g = onnx.helper.make_graph(
            [export_node(n) for n in graph.nodes],
            graph.name or "g",
            inputs,
            [export_value_info(t) for t in graph.outputs],
            inits,
        )
        model = onnx.helper.make_model(g, opset_imports=model_opsets(graph))
        source = source_or_empty(graph)
        model.ir_version = ir_version_for(graph, source.ir_version)
        model.functions.extend(source.functions)
        finish_export(graph, model.graph)
        return model


def _inputs_and_initializers(graph: gs.Graph) -> tuple[list[onnx.ValueInfoProto], list[onnx.TensorProto]]:
    """The graph's inputs plus its large constants as typed inputs; its small constants as initializers."""
    inputs = [export_value_info(t) for t in graph.inputs]
    inits, seen = [], set()
    for t in (t for node in graph.nodes for t in node.inputs if isinstance(t, gs.Constant)):
        if t.name in seen:
            continue
        seen.add(t.name)
        if constant_nbytes(t) > STRUCTURE_MAX_CONST_BYTES:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
            inputs.append(onnx.helper.make_tensor_value_info(t.name, elem, list(t.shape)))
        else:
            inits.append(export_tensor_proto(t))
    return inputs, inits
