"""Pinned input shapes: rewrite a model's inputs to concrete shapes before the passes run.

`onnxopt optimize --input-shape x=1x3x320x320` pins the dynamic axes of `x`, as
onnxsim/onnxslim do with their input shapes: shape inference (with data
propagation) then knows every shape that follows from the inputs, so `fold` can
finish the shape arithmetic (Shape -> Gather -> Concat -> Reshape chains) that a
dynamic axis keeps alive. Without `--input-shape` dynamic axes stay dynamic.

Pinning changes the model's signature on purpose: the pinned inputs take the
given dims, and output dims that become static follow. `PinnedShapes` lists
exactly those changes; the save gate compares the result with the original's
signature with these changes applied (`PinnedShapes.expected_dims`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxopt.errors import UserError
from onnxopt.ir.structure import light_copy
from onnxopt.runtime.sessions import ORT_ERRORS, make_session

Dims = tuple[int | str | None, ...]


@dataclass
class PinnedShapes:
    """What pinning changed: new dims of the pinned inputs, and of the outputs where some axis became
    static (their full new dims: an int per static axis, the kept symbol or None elsewhere)."""

    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: dict[str, Dims] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The changes as the `pinned` entry of the optimize report."""
        return {
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "outputs": {k: list(v) for k, v in self.outputs.items()},
        }

    def update_outputs(self, model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> None:
        """Give the graph outputs of `model` the static dims shape inference finds for them now.

        Run once after pinning and again after the passes, which fold shape arithmetic that
        inference alone cannot follow. A declared static dim is never changed; a negative one
        (some exporters' "dynamic") becomes unknown unless a size is found, as `onnx.checker`
        would reject it next to the size the pinned model computes. Changes are recorded in
        `outputs`. Does nothing when no input is pinned.
        """
        if not self.inputs:
            return
        inferred = inferred if inferred is not None else _infer(model)
        infos = {vi.name: vi for vi in inferred.graph.output} if inferred is not None else {}
        for out in model.graph.output:
            old = _dims(out)
            if old is None:
                continue  # no declared shape: leave it so
            dims = _merged_dims(old, _dims(infos[out.name]) if out.name in infos else None)
            if dims is None:
                continue  # inference contradicts a declared static dim: keep what the model says
            negative = any(d.HasField("dim_value") and d.dim_value < 0 for d in out.type.tensor_type.shape.dim)
            if dims != old or negative:
                _set_out_dims(out, dims)
            if dims != old:
                self.outputs[out.name] = dims

    def expected_dims(self, name: str, original: Dims | None) -> Dims | None:
        """The dims graph input/output `name` must have after pinning, given its original dims."""
        return self.inputs.get(name) or self.outputs.get(name) or original


def _dims(vi: onnx.ValueInfoProto) -> Dims | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim
    )


def _merged_dims(old: Dims, new: Dims | None) -> Dims | None:
    """Declared dims `old` with the static sizes inference found (`new`, ignored unless of the same rank).

    None when inference contradicts a declared static dim.
    """
    new = new if new is not None and len(new) == len(old) else old
    if any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(old, new)):
        return None
    return tuple(a if isinstance(a, int) else b if isinstance(b, int) else a for a, b in zip(old, new))


def _set_dims(vi: onnx.ValueInfoProto, dims: tuple[int, ...]) -> None:
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = int(d)


def _set_out_dims(vi: onnx.ValueInfoProto, dims: Dims) -> None:
    """Set static dims, keep symbolic names (and unknown axes) where no static size is known."""
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        if isinstance(d, int):
            shape.dim.add().dim_value = d
        elif d:
            shape.dim.add().dim_param = d
        else:
            shape.dim.add()


def check_pinnable(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise `UserError` unless every entry of `shapes` can pin a real input of `model`.

    A name must be a graph input that is not an initializer, the rank must match the
    declared one (when declared), a static dim must be given as it is, and every dim
    must be positive.
    """
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    for name, dims in shapes.items():
        if name not in inputs:
            raise UserError(
                f"--input-shape {name!r}: the model has no such input (inputs: {', '.join(inputs) or 'none'})"
            )
        vi = inputs[name]
        if not vi.type.HasField("tensor_type"):
            raise UserError(f"--input-shape {name!r}: only tensor inputs can be pinned")
        if any(int(d) <= 0 for d in dims):
            raise UserError(
                f"--input-shape {name!r}: every dimension must be a positive integer, got {'x'.join(map(str, dims))}"
            )
        declared = _dims(vi)
        if declared is None:
            continue
        if len(declared) != len(dims):
            raise UserError(
                f"--input-shape {name!r}: the input has rank {len(declared)} "
                f"({_show(declared)}), {len(dims)} dims given"
            )
        for k, (have, want) in enumerate(zip(declared, dims)):
            if isinstance(have, int) and have != int(want):
                raise UserError(f"--input-shape {name!r}: axis {k} is static {have} ({_show(declared)}), {want} given")


def _show(dims: Dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None) -> PinnedShapes:
    """Rewrite `model` in place so the inputs named in `shapes` have those static shapes.

    Checks the request first (`check_pinnable`, a `UserError` for the user to fix).
    Shape inference with data propagation is then run on the pinned model (weights
    left out, see `light_copy`): the main graph's `value_info` is replaced by what it
    infers, and graph outputs whose dims it finds static take them. Returns what
    changed; an empty `PinnedShapes` when `shapes` is empty.
    """
    pinned = PinnedShapes()
    if not shapes:
        return pinned
    check_pinnable(model, shapes)
    for vi in model.graph.input:
        if vi.name in shapes:
            dims = tuple(int(d) for d in shapes[vi.name])
            _set_dims(vi, dims)
            pinned.inputs[vi.name] = dims
    inferred = _infer(model)
    if inferred is not None:
        g = inferred.graph
        known = {vi.name for vi in g.input} | {i.name for i in model.graph.initializer}
        outputs = {o.name for o in model.graph.output}
        del model.graph.value_info[:]
        model.graph.value_info.extend(vi for vi in g.value_info if vi.name not in known | outputs)
    pinned.update_outputs(model, inferred)
    _check_loads(model, shapes)
    return pinned


def _check_loads(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """A pinned model must still load in onnxruntime: with static shapes its load-time inference checks
    every branch of every If, and a branch written for other sizes (e.g. another sample rate) fails
    there. That is the request's doing, so it is a `UserError`, raised before any pass runs."""
    try:
        make_session(light_copy(model))
    except ORT_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        spec = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
        raise UserError(
            f"--input-shape {spec}: the model no longer loads in onnxruntime with these shapes "
            f"({first[-240:]}); pin other sizes or leave those axes dynamic"
        ) from None


def _infer(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shape inference with data propagation on a weight-free copy; None when it fails."""
    light = light_copy(model)
    del light.graph.value_info[:]  # stale symbolic shapes of the dynamic model would be kept over static ones
    for out in light.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError):
        return None


__all__ = ["PinnedShapes", "check_pinnable", "pin_input_shapes"]
