"""Constants as folding sees them: `Constant` nodes turned into initializers, and the bytes of every
constant of a model (to report what folding generators added)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.constants import constant_nbytes
from onnxopt.ir.graph import iter_graphs, output_owners
from onnxopt.ir.gs_compat import LazyValues, stored_values
from onnxopt.passes.fold.dtypes import onnx_type_exact


def constants_to_initializers(graph: gs.Graph, counts: dict) -> int:
    """Turn `Constant` nodes into initializers (except where they produce a graph output)."""
    n = 0
    owners = output_owners(graph)
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.op != "Constant" or node.inputs or not node.outputs:
                continue
            out = node.outputs[0]
            if id(out) in owners:
                continue
            value = constant_attr_value(node)
            if value is None:
                continue
            out.to_constant(value)
            out.inputs.clear()
            n += 1
    counts["constant_nodes"] += n
    return n


#: The numeric value attributes of a `Constant` node and the dtype each one holds.
_NUMBER_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def constant_attr_value(node: gs.Node) -> np.ndarray | LazyValues | None:
    """The value of a `Constant` node, exactly as stored (a tensor attribute keeps its TensorProto, so
    bfloat16, float8, int4 and string values are not converted); None for a sparse value (kept as is)."""
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return _tensor_attr_value(a["value"])
    for name, dtype in _NUMBER_ATTRS.items():
        if name in a:
            return np.array(a[name], dtype=dtype)
    if "value_string" in a or "value_strings" in a:
        strings = [a["value_string"]] if "value_string" in a else list(a["value_strings"])
        data = [s.encode() if isinstance(s, str) else bytes(s) for s in strings]
        dims = [] if "value_string" in a else [len(data)]
        tensor = onnx.helper.make_tensor(
            node.outputs[0].name,
            onnx.TensorProto.STRING,
            dims,
            data,  # type: ignore[arg-type]  # onnx's stub omits the list of bytes a STRING tensor takes
        )
        return LazyValues(tensor)
    return None


def _tensor_attr_value(v: gs.Constant) -> np.ndarray | LazyValues:
    """A `value` tensor attribute: numbers numpy holds exactly become arrays (written as raw bytes, like
    every weight); other element types and strings stay in their TensorProto."""
    lazy = stored_values(v)
    if isinstance(lazy, LazyValues) and (
        not onnx_type_exact(lazy.tensor.data_type) or lazy.tensor.data_type == onnx.TensorProto.STRING
    ):
        return lazy
    return v.values


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of every constant of the model (initializers and Constant values, from their metadata)."""
    seen: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    seen[id(t)] = t
            v = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(v, gs.Constant):
                seen[id(v)] = v
    total = 0
    for t in seen.values():
        lazy = stored_values(t)
        if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
            total += len(lazy.tensor.raw_data)
        else:
            total += constant_nbytes(t)
    return total
