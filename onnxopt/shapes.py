"""Shape and type inference over a model, as an analysis passes can request.

Uses `onnx.shape_inference` with data propagation. Large initializers are
turned into typed graph inputs first: inference only needs their shapes, and
this keeps models over 2 GB (and the time spent copying weights) out of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Initializers above this many bytes are given to inference as shapes only.
_STRIP_BYTES = 1 << 16

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """What inference knows of a tensor: element type and per-axis size (int, symbol or None)."""

    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return helper.tensor_dtype_to_np_dtype(self.elem_type) if self.elem_type else None
        except Exception:
            return None

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def _dims(tt) -> tuple[Dim, ...] | None:
    if not tt.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model without its large initializers, which become typed inputs.

    Built field by field so the large weights are never copied (models over 2 GB included).
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
        if nbytes > _STRIP_BYTES or init.data_location == onnx.TensorProto.EXTERNAL:
            if init.name not in existing_inputs:
                g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)
    return light


def infer_tensor_info(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                      ) -> dict[str, TensorInfo]:
    """Map every tensor name of the main graph to its inferred `TensorInfo`.

    `input_shapes` pins graph inputs to concrete shapes (e.g. to count MACs).
    Inference failures leave the affected tensors unknown rather than raising.
    """
    inferred = inferred_model(model, input_shapes)
    info: dict[str, TensorInfo] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            info[vi.name] = TensorInfo(tt.elem_type, _dims(tt))
    overridable = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in overridable and init.name in info:
            continue  # also a graph input: a caller may feed another shape its declared type allows
        info[init.name] = TensorInfo(init.data_type, tuple(int(d) for d in init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    info[node.output[0]] = TensorInfo(a.t.data_type, tuple(int(d) for d in a.t.dims))
    return info


def inferred_model(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
                   ) -> onnx.ModelProto:
    """`light_copy(model)` with tensor inputs pinned to `input_shapes` and shapes inferred (subgraphs
    included: their `value_info` is filled too); the uninferred copy if inference fails."""
    light = light_copy(model)
    if input_shapes:
        for inp in light.graph.input:
            if inp.name in input_shapes and inp.type.WhichOneof("value") in (None, "tensor_type"):
                shape = input_shapes[inp.name]
                del inp.type.tensor_type.shape.dim[:]
                for d in shape:
                    inp.type.tensor_type.shape.dim.add().dim_value = int(d)
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return light


def concrete_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None,
                          default_dim: int = 64) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the model's real inputs: dynamic axis 0 -> 1, other dynamic axes -> `default_dim`."""
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if overrides and inp.name in overrides:
            shapes[inp.name] = tuple(int(d) for d in overrides[inp.name])
            continue
        dims = _dims(inp.type.tensor_type) or ()
        shapes[inp.name] = tuple(d if isinstance(d, int) and d > 0 else (1 if k == 0 else default_dim)
                                 for k, d in enumerate(dims))
    return shapes


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """`["x=1x3x48x320"]` -> `{"x": (1, 3, 48, 320)}`; None when no spec is given.

    Accepts onnxopt's `NAME=D0xD1x...` and onnxsim/onnxslim's `NAME:D0,D1,...`, and
    several specs in one string separated by spaces or semicolons (as onnxslim's
    `--input-shapes a:1,3 b:1,5` reads). A malformed spec, a dimension that is not a
    positive integer, or the same name given twice is a `UserError` (exit 2).
    """
    from onnxopt.errors import UserError

    if not specs:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in (part for s in specs for chunk in s.split(";") for part in _split_specs(chunk)):
        eq, colon = spec.rfind("="), spec.rfind(":")
        cut = max(eq, colon)
        name, dims = spec[:cut], spec[cut + 1:]
        parts = re.split(r"[x,]", dims.lower()) if cut > 0 else []
        if not name or not parts or not all(re.fullmatch(r"[+-]?\d+", d) for d in parts):
            raise UserError(f"--input-shape {spec!r}: write NAME=D0xD1x... or NAME:D0,D1,..., e.g. x=1x3x48x320")
        dims_t = tuple(int(d) for d in parts)
        if any(d <= 0 for d in dims_t):
            raise UserError(f"--input-shape {spec!r}: every dimension must be a positive integer")
        if name in shapes and shapes[name] != dims_t:
            raise UserError(f"--input-shape: {name!r} given twice with different shapes")
        shapes[name] = dims_t
    return shapes or None


def _split_specs(chunk: str) -> list[str]:
    """Specs separated by whitespace, unless a token has no `=`/`:` (then a name holds a space)."""
    tokens = chunk.split()
    if all("=" in t or ":" in t for t in tokens):
        return tokens
    return [chunk.strip()] if chunk.strip() else []


def numpy_dtype(elem_type: int) -> np.dtype:
    """Numpy dtype of an ONNX element type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


__all__ = ["TensorInfo", "infer_tensor_info", "concrete_input_shapes", "numpy_dtype", "numpy_helper"]
