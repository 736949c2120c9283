"""The in-memory IR (onnx-graphsurgeon) and the helpers every pass shares, in one import.

The helpers live in modules named for what they hold; this module gathers them so a pass
imports its toolkit from one place, and adds content hashes:

- `onnxopt.ir.traversal`: every (sub)graph, an iterative topological sort, `cleanup`;
- `onnxopt.ir.importer` / `onnxopt.ir.exporter`: ModelProto <-> gs.Graph, keeping what gs drops;
- `onnxopt.ir.structure`: weight-free views for inference and statistics;
- `onnxopt.ir.constants`: constants, their values and sizes, new weights;
- `onnxopt.ir.rewrite_helpers`: rewiring uses, detaching nodes, fresh names;
- `onnxopt.ir.graph_state`: what onnxopt remembers about a graph (beside it, not on it);
- `onnxopt.ir.gs_compat`: the only module touching gs internals.
"""

from __future__ import annotations

import hashlib

import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import (
    constant_nbytes,
    constant_shape,
    constant_value,
    is_constant,
    new_constant,
    producer,
    stage_new_constants,
)
from onnxopt.ir.exporter import export_model
from onnxopt.ir.gs_compat import MappedValues
from onnxopt.ir.importer import import_model, name_unnamed_nodes
from onnxopt.ir.rewrite_helpers import detach, graph_output_owner, output_owners, replace_all_uses, unique_name
from onnxopt.ir.structure import STRUCTURE_MAX_CONST_BYTES, export_structure
from onnxopt.ir.traversal import (
    all_graph_protos,
    cleanup,
    iter_graphs,
    model_opsets,
    subgraph_protos,
    subgraphs_of,
    toposort,
)

__all__ = [
    "STRUCTURE_MAX_CONST_BYTES",
    "MappedValues",
    "all_graph_protos",
    "cleanup",
    "constant_nbytes",
    "constant_shape",
    "constant_value",
    "detach",
    "export_model",
    "export_structure",
    "graph_hash",
    "graph_output_owner",
    "import_model",
    "is_constant",
    "iter_graphs",
    "model_hash",
    "model_opsets",
    "name_unnamed_nodes",
    "new_constant",
    "output_owners",
    "producer",
    "replace_all_uses",
    "stage_new_constants",
    "subgraph_protos",
    "subgraphs_of",
    "toposort",
    "unique_name",
]


def graph_hash(graph: gs.Graph) -> str:
    """A content hash of the graph (structure, attributes and weight values), used to check `changed`.

    Weights are hashed by value, not by encoding: a constant read by a pass (gs then holds it as a
    numpy array) is written back as `raw_data` though the model stored it in `float_data`; that
    must not count as a change. Nodes are hashed in the order they would be saved in (sorted):
    an analysis that sorts the graph in place changes nothing a user gets."""
    model = export_model(graph)
    for g in all_graph_protos(model.graph):
        for t in g.initializer:
            _as_raw_data(t)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    _as_raw_data(attr.t)
    return model_hash(model)


#: Element types one value per byte or more, whose `numpy_helper.to_array` bytes are their raw layout
#: (sub-byte types such as int4 are packed differently and strings have no raw form: left as stored).
_UNPACKED_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT",
        "UINT8",
        "INT8",
        "UINT16",
        "INT16",
        "INT32",
        "INT64",
        "BOOL",
        "FLOAT16",
        "DOUBLE",
        "UINT32",
        "UINT64",
        "COMPLEX64",
        "COMPLEX128",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
    )
)


def _as_raw_data(t: onnx.TensorProto) -> None:
    """Re-encode a tensor stored in typed fields (float_data, int32_data, ...) as raw_data, in place."""
    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _UNPACKED_TYPES:
        return
    raw = onnx.numpy_helper.to_array(t).tobytes()
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    t.raw_data = raw


def model_hash(model: onnx.ModelProto) -> str:
    """Content hash of a ModelProto."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
