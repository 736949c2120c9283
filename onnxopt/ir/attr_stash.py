"""Node attributes onnx-graphsurgeon drops, carried through it as strings.

gs drops TYPE_PROTO attributes (e.g. `Optional <type=...>`) and SPARSE_TENSOR ones
(`Constant <sparse_value=...>`). Before import they become base64 strings under a prefixed
name, which gs keeps; after export they are turned back.
"""

from __future__ import annotations

import base64

import onnx

from onnxopt.ir.traversal import all_graph_protos

#: Prefix of a stashed TYPE_PROTO attribute's name.
TYPE_ATTR_PREFIX = "_onnxopt_type_proto:"
#: Prefix of a stashed SPARSE_TENSOR attribute's name.
SPARSE_ATTR_PREFIX = "_onnxopt_sparse_tensor:"
_STASHED = {
    onnx.AttributeProto.TYPE_PROTO: (TYPE_ATTR_PREFIX, "tp", onnx.TypeProto),
    onnx.AttributeProto.SPARSE_TENSOR: (SPARSE_ATTR_PREFIX, "sparse_tensor", onnx.SparseTensorProto),
}


def stash_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, or a copy whose TYPE_PROTO and SPARSE_TENSOR attributes are base64 strings gs keeps
    (undone on export by `unstash_attributes`)."""
    if not any(a.type in _STASHED for g in all_graph_protos(model.graph) for n in g.node for a in n.attribute):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for g in all_graph_protos(copy.graph):
        for node in g.node:
            for a in node.attribute:
                if a.type in _STASHED:
                    prefix, field, _ = _STASHED[a.type]
                    encoded = base64.b64encode(getattr(a, field).SerializeToString()).decode()
                    a.CopyFrom(onnx.helper.make_attribute(prefix + a.name, encoded))
    return copy


def unstash_attributes(g: onnx.GraphProto) -> None:
    """Turn the stashed attributes of an exported graph (subgraphs included) back into their types."""
    for cur in all_graph_protos(g):
        for node in cur.node:
            for a in node.attribute:
                _unstash(a)


def _unstash(a: onnx.AttributeProto) -> None:
    for prefix, _, cls in _STASHED.values():
        if a.name.startswith(prefix):
            value = cls()
            value.ParseFromString(base64.b64decode(a.s))
            a.CopyFrom(onnx.helper.make_attribute(a.name[len(prefix) :], value))
