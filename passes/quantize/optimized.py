"""What onnxruntime makes of a model: the node types of its optimized CPU-EP graph.

The quantize pass asks it which integer kernels were really chosen (a weight
DequantizeLinear that survives was not fused) and whether int8-stored weights
were folded back into float constants when the session loaded.
"""

from __future__ import annotations

import collections
import os
import tempfile

import onnx

from onnxopt.passes.quantize.proto_graphs import walk_graphs
from onnxopt.runtime.sessions import make_session, session_options


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


def same_optimized_graph(a: onnx.ModelProto, b: onnx.ModelProto, subgraphs: bool = False) -> bool:
    """Whether onnxruntime's optimized graphs of `a` and `b` have the same node types (so the
    int8-stored weights of one were folded back into constants at load); `subgraphs`: bodies too."""
    return collections.Counter(optimized_op_types(a, subgraphs=subgraphs)) == collections.Counter(
        optimized_op_types(b, subgraphs=subgraphs)
    )
