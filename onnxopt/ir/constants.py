"""Constants in a gs.Graph: recognising them, their values and sizes, and new weights a pass computes.

In a graph whose weights are staged on disk (big models, `onnxopt.ir.weights`), a large
constant a pass creates is spilled to the staging directory at once and memory-mapped back,
so a pass rewriting many weights holds one new weight at a time, not all of them until export.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir import weights
from onnxopt.ir.graph_state import is_mapped
from onnxopt.ir.gs_compat import export_dtype_override, map_staged, stored_values
from onnxopt.ir.traversal import iter_graphs


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node producing `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def is_constant(tensor: gs.Tensor) -> bool:
    """True for initializers and tensors computed by a Constant node with a value attribute."""
    if isinstance(tensor, gs.Constant):
        return True
    p = producer(tensor)
    return p is not None and p.op == "Constant" and "value" in p.attrs and not p.inputs


def constant_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """Shape of a constant tensor (see `is_constant`) from metadata, without loading its values."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    p = producer(tensor)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return tuple(p.attrs["value"].shape)
    return None


def constant_value(tensor: gs.Tensor):
    """Numpy value of a constant tensor (see `is_constant`), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    p = producer(tensor)
    if p is not None and p.op == "Constant" and "value" in p.attrs:
        v = p.attrs["value"]
        return v.values if isinstance(v, gs.Constant) else None
    return None


def constant_nbytes(t: gs.Constant) -> int:
    """Bytes of a constant from its metadata, its values not loaded. ONNX element types numpy has
    no dtype for (bfloat16, float8 as gs reports them) count one byte each; no shape counts 0."""
    if t.shape is None:
        return 0
    try:
        itemsize = np.dtype(t.dtype).itemsize
    except TypeError:
        itemsize = 1
    return constant_elements(t) * itemsize


def constant_elements(t: gs.Constant) -> int:
    """Number of elements of a constant, from its shape (0 without one)."""
    return int(np.prod(t.shape, dtype=np.float64)) if t.shape is not None else 0


def all_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every constant of the graph and its subgraphs, `Constant` node values included, each once."""
    consts: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                consts[id(t)] = t
        for node in g.nodes:
            v = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(v, gs.Constant):
                consts[id(v)] = v
    return list(consts.values())


def raw_array(t: gs.Constant) -> np.ndarray | None:
    """The array of an in-memory numeric constant whose bytes are written as they are (gs converts
    nothing on export), else None."""
    v = stored_values(t)
    if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf":
        return None
    exported = export_dtype_override(t)  # set when gs is to convert the values on export
    return v if exported is None or (not isinstance(exported, int) and np.dtype(exported) == v.dtype) else None


def spillable(graph: gs.Graph, t: gs.Constant) -> bool:
    """Whether `t` is a large in-memory weight of a graph whose weights are staged on disk."""
    arr = raw_array(t)
    return arr is not None and arr.nbytes >= weights.SPILL_BYTES and is_mapped(graph)


def stage_constant(t: gs.Constant) -> onnx.TensorProto:
    """Spill constant `t`'s array to the staging directory and let `t` map it from there: the array
    leaves memory and every later export refers to the file. Returns the staged tensor."""
    proto = onnx.TensorProto(name=t.name)
    weights.spill(t.values, proto)
    map_staged(t, proto)
    return proto


def new_constant(graph: gs.Graph, name: str, values: np.ndarray) -> gs.Constant:
    """A constant for a weight a pass computed, spilled to disk at once when `spillable`."""
    c = gs.Constant(name, values)
    if spillable(graph, c):
        stage_constant(c)
    return c


def stage_new_constants(graph: gs.Graph) -> None:
    """In a graph whose weights are staged on disk, spill every large in-memory constant (the
    manager calls it after each pass, for passes that create constants another way)."""
    if not is_mapped(graph):
        return
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and spillable(graph, t):
                stage_constant(t)
