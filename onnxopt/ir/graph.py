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
    """A content hash of the graph (structure, attributes and weights), used to check `changed`."""
    return model_hash(export_model(graph, sort=False))


def model_hash(model: onnx.ModelProto) -> str:
    """Content hash of a ModelProto."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
