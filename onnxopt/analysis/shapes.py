"""Shape and type inference over a model, as an analysis passes can request.

Uses `onnx.shape_inference` with data propagation. Large initializers are
turned into typed graph inputs first (`onnxopt.ir.structure.light_copy`): inference only
needs their shapes, and this keeps models over 2 GB (and the time spent copying weights) out of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.analysis.contrib_shapes import with_standins
from onnxopt.errors import UserError
from onnxopt.ir.ops import CONTRIB_DOMAIN
from onnxopt.ir.structure import light_copy

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
        except KeyError:  # an element type this onnx has no numpy dtype for
            return None

    @property
    def static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)


def tensor_dims(tt: onnx.TypeProto.Tensor) -> tuple[Dim, ...] | None:
    """Per-axis sizes of a tensor type (int, symbolic name or None), None without a shape."""
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


def infer_tensor_info(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, TensorInfo]:
    """Map every tensor name of the main graph to its inferred `TensorInfo`.

    `input_shapes` pins graph inputs to concrete shapes (e.g. to count MACs).
    Inference failures leave the affected tensors unknown rather than raising.
    """
    info = declared_info(inferred_model(model, input_shapes).graph)
    # an initializer that is also a graph input keeps the input's declared type: a caller may feed another shape
    overridable = {i.name for i in model.graph.input if i.name in info}
    info.update(constant_info(model.graph, skip=overridable))
    return info


def declared_info(g: onnx.GraphProto, symbols: dict[str, int] | None = None) -> dict[str, TensorInfo]:
    """`TensorInfo` of the tensors `g` describes (inputs, value_info, outputs). Named dimensions in
    `symbols` take its value."""
    info: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            dims = tensor_dims(vi.type.tensor_type)
            if symbols and dims is not None:
                dims = tuple(symbols.get(d, d) if isinstance(d, str) else d for d in dims)
            info[vi.name] = TensorInfo(vi.type.tensor_type.elem_type, dims)
    return info


def constant_info(g: onnx.GraphProto, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, TensorInfo]:
    """`TensorInfo` of `g`'s initializers (but those in `skip`) and Constant node values."""
    info: dict[str, TensorInfo] = {}
    for init in g.initializer:
        if init.name not in skip:
            info[init.name] = TensorInfo(init.data_type, tuple(int(d) for d in init.dims))
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    info[node.output[0]] = TensorInfo(a.t.data_type, tuple(int(d) for d in a.t.dims))
    return info


def inferred_model(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
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
    inferred = _infer(light)
    if any(n.domain == CONTRIB_DOMAIN for n in light.graph.node):
        # onnx does not know onnxruntime's com.microsoft ops: every tensor after one would stay
        # unknown. Inference on a copy with shape-equivalent stand-ins supplies those shapes; the
        # returned model keeps its real nodes (statistics count them).
        stand = onnx.ModelProto()
        stand.CopyFrom(light)
        known = {vi.name for vi in inferred.graph.value_info} | {o.name for o in inferred.graph.output}
        produced = {o for n in light.graph.node for o in n.output}
        extra = [
            vi for vi in _infer(with_standins(stand)).graph.value_info if vi.name in produced and vi.name not in known
        ]
        inferred.graph.value_info.extend(extra)
    if input_shapes:
        _concrete_from_symbolic(inferred, light)
    return inferred


def _concrete(vi: onnx.ValueInfoProto) -> bool:
    dims = tensor_dims(vi.type.tensor_type) if vi.type.HasField("tensor_type") else None
    return dims is not None and all(isinstance(d, int) for d in dims)


@contextlib.contextmanager
def _working_directory(path: str) -> Iterator[None]:
    """Run the block with `path` as the working directory (restored after)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _concrete_from_symbolic(inferred: onnx.ModelProto, light: onnx.ModelProto) -> None:
    """Where onnx's inference left a dim symbolic though the inputs are pinned (a Slice whose end is
    computed from Shape(input), as BERT-style exports slice their position table), take the concrete
    shape onnxruntime's symbolic shape inference finds, in place. Best effort: its failure changes
    nothing."""
    # imported here: it pulls in sympy (about half a second), needed only for pinned, unresolved shapes
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    missing = [vi for vi in [*inferred.graph.value_info, *inferred.graph.output] if not _concrete(vi)]
    known = {vi.name for vi in inferred.graph.value_info}
    produced = {o for n in light.graph.node for o in n.output if o and o not in known}
    if not missing and not produced:
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(light)
    copy = with_standins(copy)  # its inference stops at contrib ops it lacks rules for (QAttention)
    try:
        # when its inference is incomplete it saves the model into the working directory before
        # raising: run it in a private one, so nothing is ever left in the user's
        with tempfile.TemporaryDirectory(prefix="onnxopt-shapes-") as tmp, _working_directory(tmp):
            sym = SymbolicShapeInference.infer_shapes(copy, auto_merge=True)
    except Exception:  # noqa: BLE001 - a second opinion only: any failure keeps onnx's shapes
        return
    if sym is None:  # it declines models below opset 7
        return
    better = {vi.name: vi for vi in [*sym.graph.value_info, *sym.graph.output] if _concrete(vi)}
    for vi in missing:
        if vi.name in better:
            vi.CopyFrom(better[vi.name])
    inferred.graph.value_info.extend(better[n] for n in sorted(produced) if n in better)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """`onnx.shape_inference` with data propagation; `model` itself if inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort: any failure leaves the shapes unknown
        return model


def concrete_input_shapes(
    model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]] | None = None, default_dim: int = 64
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the model's real inputs: dynamic axis 0 -> 1, other dynamic axes -> `default_dim`."""
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if overrides and inp.name in overrides:
            shapes[inp.name] = tuple(int(d) for d in overrides[inp.name])
            continue
        dims = tensor_dims(inp.type.tensor_type) or ()
        shapes[inp.name] = tuple(
            d if isinstance(d, int) and d > 0 else (1 if k == 0 else default_dim) for k, d in enumerate(dims)
        )
    return shapes


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """`["x=1x3x48x320"]` -> `{"x": (1, 3, 48, 320)}`; None when no spec is given.

    Accepts onnxopt's `NAME=D0xD1x...` and onnxsim/onnxslim's `NAME:D0,D1,...`, and
    several specs in one string separated by spaces or semicolons (as onnxslim's
    `--input-shapes a:1,3 b:1,5` reads). A malformed spec, a dimension that is not a
    positive integer, or the same name given twice is a `UserError` (exit 2).
    """
    if not specs:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in (part for s in specs for chunk in s.split(";") for part in _split_specs(chunk)):
        eq, colon = spec.rfind("="), spec.rfind(":")
        cut = max(eq, colon)
        name, dims = spec[:cut], spec[cut + 1 :]
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


__all__ = [
    "TensorInfo",
    "concrete_input_shapes",
    "constant_info",
    "declared_info",
    "infer_tensor_info",
    "light_copy",
    "numpy_dtype",
    "numpy_helper",
    "tensor_dims",
]
