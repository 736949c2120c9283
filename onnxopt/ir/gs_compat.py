"""Every use of onnx-graphsurgeon internals, in one place.

onnxopt relies on a few gs names that are not part of its documented API:

- `onnx_graphsurgeon.ir.tensor.LazyValues` (constructor, `.tensor`, `.shape`, `.dtype`, `.load()`,
  subclassed by `MappedValues`): a constant whose values are still in their TensorProto;
- `Constant._values` (read and written): a constant's values without loading them;
- `Constant._export_dtype`: the dtype gs converts a constant's values to on export;
- `onnx_graphsurgeon.exporters.onnx_exporter.OnnxExporter.export_tensor_proto / export_node /
  export_value_info_proto`: one tensor, node or value info as a proto, without exporting a graph;
- `onnx_graphsurgeon.logger.G_LOGGER.log` (replaced) and `.severity`: gs prints its warnings to stdout;
- `OnnxExporter.export_tensor_proto` (wrapped on import, `install_packed_export`): gs writes an array's
  `tobytes()`, one byte per element, which for the 4-bit and 2-bit types onnx packs (uint4, int4,
  float4e2m1, uint2, int2) is twice or four times the size onnx expects, so the export fails.

Checked on onnx-graphsurgeon 0.6.1 with onnx 1.23 (0.5.x was not available to check).
`tests/ir/test_gs_compat.py` exercises each of them, so a gs release that changes one fails there first.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnxopt.ir import weights

#: gs's own `export_tensor_proto`, which `install_packed_export` wraps.
_GS_EXPORT_TENSOR_PROTO = OnnxExporter.export_tensor_proto

__all__ = [
    "EXPORTABLE_TYPES",
    "LazyValues",
    "MappedValues",
    "export_dtype_override",
    "export_node",
    "export_tensor_proto",
    "export_value_info",
    "install_packed_export",
    "lazy_tensor",
    "map_staged",
    "onnx_layout_array",
    "route_logging",
    "set_stored_values",
    "stored_values",
]

#: Value types gs can export; graph inputs/outputs of other types (optional, map) are restored after it.
EXPORTABLE_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type")


class MappedValues(LazyValues):
    """gs lazy values of a staged external tensor: loading memory-maps the file (`onnxopt.ir.weights`)
    instead of reading it into the TensorProto and copying it twice, as gs's own loader would."""

    def load(self) -> np.ndarray:
        return weights.mapped(self.tensor)


def stored_values(t: gs.Constant) -> np.ndarray | LazyValues | None:
    """A constant's values as gs holds them, without loading them (None once it became a variable)."""
    return getattr(t, "_values", None)


def set_stored_values(t: gs.Constant, values: np.ndarray | LazyValues) -> None:
    """Replace a constant's values as gs holds them (a lazy value stays lazy)."""
    t._values = values


def lazy_tensor(t: gs.Constant) -> onnx.TensorProto | None:
    """The TensorProto of a constant whose values are not loaded yet, else None."""
    v = stored_values(t)
    return v.tensor if isinstance(v, LazyValues) else None


def map_staged(t: gs.Constant, proto: onnx.TensorProto) -> None:
    """Make constant `t` read its values from the staged external tensor `proto` (memory-mapped)."""
    set_stored_values(t, MappedValues(proto))


def export_dtype_override(t: gs.Constant) -> np.dtype | int | None:
    """The dtype gs converts `t`'s values to on export (a numpy dtype or an ONNX data type), None when it
    writes them as they are."""
    return getattr(t, "_export_dtype", None)


def export_tensor_proto(t: gs.Constant) -> onnx.TensorProto:
    """Constant `t` as a TensorProto, the way gs exports it."""
    return OnnxExporter.export_tensor_proto(t)


def onnx_layout_array(t: gs.Constant) -> np.ndarray | None:
    """The in-memory array of `t` when onnx must lay out its bytes (`numpy_helper.from_array`): a dtype
    numpy lacks and ml_dtypes supplies (int4, uint4, float4, int2, float8, bfloat16), written as it is
    (no other export dtype asked for). Else None: gs writes `t` itself."""
    v = stored_values(t)
    if not isinstance(v, np.ndarray) or v.dtype.isbuiltin == 1:  # 2: a dtype a library (ml_dtypes) defines
        return None
    try:
        onnx_type = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
    except (KeyError, TypeError, ValueError):  # a structured dtype: not an ONNX element type at all
        return None
    exported = export_dtype_override(t)
    if exported is None or exported == onnx_type:
        return v
    return v if not isinstance(exported, int) and np.dtype(exported) == v.dtype else None


def _export_tensor_proto_packed(tensor: gs.Constant) -> onnx.TensorProto:
    """gs's `export_tensor_proto`, but arrays of the types onnx packs are written by onnx's own
    `from_array` (two 4-bit or four 2-bit values per byte), with the same bytes a model stores."""
    arr = onnx_layout_array(tensor)
    if arr is None:
        return _GS_EXPORT_TENSOR_PROTO(tensor)
    proto = onnx.numpy_helper.from_array(arr, tensor.name)
    if tensor.data_location is not None:
        proto.data_location = tensor.data_location
    return proto


def install_packed_export() -> None:
    """Make gs export constants through `_export_tensor_proto_packed` everywhere it writes one
    (initializers, Constant node values, tensor attributes, function bodies). Idempotent."""
    OnnxExporter.export_tensor_proto = staticmethod(_export_tensor_proto_packed)


def export_node(node: gs.Node) -> onnx.NodeProto:
    """`node` as a NodeProto (subgraph attributes exported too), the way gs exports it."""
    return OnnxExporter.export_node(node)


def export_value_info(t: gs.Tensor) -> onnx.ValueInfoProto:
    """Tensor `t`'s name, dtype and shape as a ValueInfoProto (no type check)."""
    return OnnxExporter.export_value_info_proto(t, do_type_check=False)


def route_logging(quiet: bool) -> None:
    """Send gs's warnings (printed to stdout) to stderr, where they cannot mix with reports or JSON;
    with `quiet`, keep only its errors. Idempotent."""
    if not getattr(G_LOGGER.log, "_to_stderr", False):
        log = G_LOGGER.log

        def to_stderr(*a, **k):
            with contextlib.redirect_stdout(sys.stderr):
                return log(*a, **k)

        vars(to_stderr)["_to_stderr"] = True  # the mark that keeps a second call from wrapping it again
        G_LOGGER.log = to_stderr
    if quiet:
        G_LOGGER.severity = G_LOGGER.ERROR


install_packed_export()
