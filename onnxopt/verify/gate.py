"""The save gate: the check every optimized model passes before it is written.

`gate` runs `onnx.checker` (full), compares the whole signature of the original
(input and output names, dtypes, ranks, dimensions with their symbolic names) and
loads the model in onnxruntime. A model that fails is not written (`GateFailed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from onnxopt.ir.structure import structure_only
from onnxopt.runtime.sessions import make_session

Dim = int | str | None


@dataclass(frozen=True)
class ValueSignature:
    """One graph input or output: name, type kind, element type and dims (None: no shape declared).

    Non-tensor types (sequence, optional, map) are compared as their whole serialized `TypeProto`.
    """

    name: str
    kind: str
    elem_type: int
    dims: tuple[Dim, ...] | None
    detail: bytes = b""


@dataclass(frozen=True)
class Signature:
    """A model's inputs (below IR 4: initializers excluded) and outputs, in order."""

    inputs: tuple[ValueSignature, ...]
    outputs: tuple[ValueSignature, ...]


def _value_signature(vi: onnx.ValueInfoProto) -> ValueSignature:
    kind = vi.type.WhichOneof("value") or "none"
    if kind != "tensor_type":
        return ValueSignature(vi.name, kind, 0, None, vi.type.SerializeToString(deterministic=True))
    tt = vi.type.tensor_type
    dims = None
    if tt.HasField("shape"):
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in tt.shape.dim
        )  # dim_value -1 (some exporters): a dynamic axis
    return ValueSignature(vi.name, "tensor", tt.elem_type, dims)


def signature(model: onnx.ModelProto) -> Signature:
    """The signature of a model's main graph (see `Signature`).

    From IR 4 on, an initializer listed as a graph input is an overridable default and part of the
    signature; below IR 4 every initializer had to be listed, and those are constants, not inputs.
    """
    inits = {t.name for t in model.graph.initializer} if model.ir_version < 4 else set()
    return Signature(
        tuple(_value_signature(v) for v in model.graph.input if v.name not in inits),
        tuple(_value_signature(v) for v in model.graph.output),
    )


def _dim_text(dims: tuple[Dim, ...] | None) -> str:
    return (
        "no shape"
        if dims is None
        else "[" + ", ".join("?" if d is None else repr(d) if isinstance(d, str) else str(d) for d in dims) + "]"
    )


def _dims_kept(ref: tuple[Dim, ...], new: tuple[Dim, ...] | None, pins: tuple[int, ...] | None, pinned: bool) -> bool:
    """Whether `new` keeps the dims `ref`: equal, or a symbolic/unknown dim made concrete by pinning
    (`pins`: this input's pinned shape; `pinned`: shapes were pinned at all), or an unknown dim named."""
    if new is None or len(new) != len(ref):
        return False
    for k, (r, n) in enumerate(zip(ref, new)):
        if r == n:
            continue
        if isinstance(n, int) and not isinstance(r, int):
            ok = (pins[k] == n) if pins is not None and k < len(pins) else pinned
        else:
            ok = r is None and isinstance(n, str)  # an unknown axis given a symbolic name loses nothing
        if not ok:
            return False
    return True


def _value_changes(
    ref: ValueSignature, new: ValueSignature, what: str, pins: tuple[int, ...] | None, pinned: bool
) -> list[str]:
    """Differences of one input/output. `pins`: the pinned shape of this input; `pinned`: shapes were pinned
    at all, so a symbolic or unknown dimension may have become concrete (outputs follow their inputs)."""
    where = f"{what} '{ref.name}'"
    if ref.kind != new.kind or ref.detail != new.detail:
        return [f"{where}: type changed ({ref.kind} -> {new.kind})"]
    if ref.elem_type != new.elem_type:
        return [
            f"{where}: dtype {onnx.TensorProto.DataType.Name(ref.elem_type)} became "
            f"{onnx.TensorProto.DataType.Name(new.elem_type)}"
        ]
    if ref.dims is None or _dims_kept(ref.dims, new.dims, pins, pinned):
        return []
    return [f"{where}: shape {_dim_text(ref.dims)} became {_dim_text(new.dims)}"]


def signature_changes(ref: Signature, new: Signature, pinned: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Every way `new` breaks the signature `ref`, as readable lines (empty: kept).

    Names, order, dtypes, ranks and dimensions (symbolic names included) must be
    equal. With `pinned` input shapes (`--input-shape`), a pinned input's dimension
    may become its pinned value, and outputs' symbolic dimensions may become concrete.
    """
    pinned = pinned or {}
    problems = []
    for what, r_list, n_list in (("input", ref.inputs, new.inputs), ("output", ref.outputs, new.outputs)):
        r_names, n_names = [v.name for v in r_list], [v.name for v in n_list]
        if r_names != n_names:
            problems.append(f"{what}s {r_names} became {n_names}")
            continue
        for r, n in zip(r_list, n_list):
            pins = pinned.get(r.name) if what == "input" else None
            problems += _value_changes(r, n, what, pins, bool(pinned))
    return problems


class GateFailed(Exception):
    """The model about to be saved is invalid; it is not written. Carries the rejected model."""

    def __init__(self, message: str, model: onnx.ModelProto | None = None):
        super().__init__(message)
        self.model = model


@dataclass
class Reference:
    """What the gate compares a result with: the original's signature, and the original itself on
    demand (loaded only when the result fails a check, to tell whether the original fails it too)."""

    signature: Signature
    load: Callable[[], onnx.ModelProto] | None = None
    pinned: dict[str, tuple[int, ...]] | None = None
    _original: onnx.ModelProto | None = field(default=None, repr=False)

    def original(self) -> onnx.ModelProto | None:
        if self._original is None and self.load is not None:
            self._original = self.load()
        return self._original


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _checker_error(model: onnx.ModelProto, full: bool) -> str | None:
    try:
        onnx.checker.check_model(structure_only(model), full_check=full)
    except Exception as exc:  # noqa: BLE001 - the gate's point: any checker failure (ValidationError, InferenceError...) rejects
        return _first_line(exc)
    return None


def _load_error(model: onnx.ModelProto) -> str | None:
    try:
        make_session(model)
    except Exception as exc:  # noqa: BLE001 - the gate's point: any onnxruntime load failure rejects
        return _first_line(exc)
    return None


def gate(model: onnx.ModelProto, reference: Reference | None = None) -> None:
    """The check every optimized model passes before it is written; raises `GateFailed` if it does not.

    1. `onnx.checker` with `full_check` (on a weight-free copy);
    2. the whole signature of the original (`signature_changes`);
    3. a load in onnxruntime (CPU).
    A check the original itself fails (a model the checker's strict inference or this
    onnxruntime cannot handle) is relaxed to what the original passes: the tool is
    judged on what it changed.
    """
    _gate_checker(model, reference)
    if reference is not None:
        _gate_signature(model, reference)
    err = _load_error(model)
    if err is not None:
        orig = reference.original() if reference is not None else None
        if orig is None or _load_error(orig) is None:
            raise GateFailed(f"onnxruntime cannot load the optimized model: {err}", model)


def _gate_checker(model: onnx.ModelProto, reference: Reference | None) -> None:
    """`onnx.checker` (full); relaxed to the structural check when the original fails the full one too."""
    err = _checker_error(model, full=True)
    if err is None:
        return
    orig = reference.original() if reference is not None else None
    if orig is None or _checker_error(orig, full=True) is None or _checker_error(model, full=False) is not None:
        raise GateFailed(f"onnx.checker rejects the optimized model: {err}", model)


def _gate_signature(model: onnx.ModelProto, reference: Reference) -> None:
    problems = signature_changes(reference.signature, signature(model), reference.pinned)
    if problems:
        raise GateFailed(
            "the optimized model changed the signature: "
            + "; ".join(problems[:3])
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
            model,
        )
