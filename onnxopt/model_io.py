"""Loading and saving models: validation of input files, external data, atomic writes, the save gate.

Saving goes to a temporary name in the destination directory and is renamed into
place, so a failure never leaves a half-written model and the input is never touched.
Before an optimized model is saved, `gate` checks it: `onnx.checker` (full), the
whole signature of the original, and a load in onnxruntime.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError

from onnxopt import weights
from onnxopt.errors import UserError

TWO_GB = 2**31
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_THRESHOLD = 1024


def load_model(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, raising `UserError` with one clear line for any bad input."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file (give the path of an .onnx model)")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not an .onnx model file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not an ONNX model (protobuf parse failed: {str(exc).splitlines()[0][:120]})") from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{p}: parses as protobuf but holds no ONNX graph (is it really a model?)")
    if not model.opset_import:
        raise UserError(f"{p}: model declares no opset_import; re-export it with an opset")
    if load_external and uses_external_data(model):
        _attach_external_data(model, p)
    try:
        onnx.checker.check_model(structure_only(model))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"{p}: not a valid ONNX model: {first}") from None
    return model


def _attach_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Check the model's external data files, then read them in, or stage them when they are big.

    Above `weights.MAP_EXTERNAL_BYTES` the weights stay on disk (memory-mapped on
    use, see `onnxopt.weights`), so a model of any size is never held whole in memory.
    Only main-graph initializers are staged; a model keeping Constant-node or
    subgraph data externally is read in.
    """
    base = p.resolve().parent
    tensors = _external_tensors(model)
    sizes: dict[str, int] = {}
    total = 0
    for t in tensors:
        loc, offset, _ = weights.external_info(t)
        f = base / loc
        if not loc or not f.is_file():
            raise UserError(f"{p}: external data file '{loc}' for tensor '{t.name}' is missing next to the model")
        size = sizes.setdefault(loc, f.stat().st_size)
        n = weights.external_nbytes(t)
        if offset + n > size:
            raise UserError(f"{p}: external data file '{loc}' is truncated: tensor '{t.name}' needs bytes "
                            f"{offset}..{offset + n}, the file has {size}")
        total += n
    initializers = {id(t) for t in model.graph.initializer}
    if total >= weights.MAP_EXTERNAL_BYTES and all(id(t) in initializers for t in tensors):
        staged = {loc: weights.stage_file(base / loc) for loc in sizes}
        for t in tensors:
            loc, offset, _ = weights.external_info(t)
            weights.set_external(t, staged[loc], offset, weights.external_nbytes(t))
        return
    try:
        onnx.load_external_data_for_model(model, str(base))
    except Exception as exc:  # unreadable data file
        raise UserError(f"{p}: cannot read external data ({exc})") from None


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers as typed inputs: what `onnx.checker` needs, no weight copy.

    The checker serializes the model and parses it again in C++; on the full model
    that would hold the weights two more times (and fail above 2 GB).
    """
    from onnxopt.shapes import light_copy

    return light_copy(model)


def _external_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model lives in an external file."""
    return bool(_external_tensors(model))


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """True if the model serializes as one protobuf (< 2 GB); ByteSize() itself raises above that."""
    try:
        return model.ByteSize() < TWO_GB
    except EncodeError:
        return False


def model_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensor data (in memory or staged on disk), without serializing the model."""
    from onnx.external_data_helper import _get_all_tensors

    return sum(weights.external_nbytes(t) if weights.is_external(t) else len(t.raw_data)
               for t in _get_all_tensors(model))


def model_files(path: str | os.PathLike) -> set[Path]:
    """The resolved paths of a model file and of every external data file it refers to.

    These are the files an output must never overwrite. Only the protobuf is parsed
    (no weight is read); a file that is not a model counts as itself alone.
    """
    p = Path(path).resolve()
    if not p.is_file():
        return {p}
    st = p.stat()
    return {p} | set(_external_files(str(p), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=64)
def _external_files(path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """External data files of the model at `path` (cached per file version: the CLI, the API and
    optimize-many ask about the same input several times, and parsing a big model is not free)."""
    p = Path(path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: load_model reports it; here it is one file to protect
        return ()
    locs = {weights.external_info(t)[0] for t in _external_tensors(model)}
    return tuple(sorted((p.parent / loc).resolve() for loc in locs if loc))


def data_file_of(out: str | os.PathLike) -> Path:
    """Where `save_model` puts the external data of a model saved at `out`: `<name>.data` beside the
    file `out` resolves to (a symlinked output is written at its target, model and data together)."""
    target = Path(out).resolve()
    return target.parent / (target.name + ".data")


def check_data_beside(out: str | os.PathLike) -> None:
    """Refuse a symlinked output whose target lies in another directory when external data is written:
    readers (onnx, onnxruntime) look for the data file beside the path they are given, the link, while
    it must sit beside the model file, at the target."""
    o = Path(out)
    if o.is_symlink() and o.resolve().parent != o.absolute().parent.resolve():
        raise UserError(f"{o}: is a symbolic link to {o.resolve()} in another directory; with external data the "
                        "model and its data file must sit together: give the link's target as the output")


def check_output_path(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = (),
                      protected: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """Validate an output path before any work is done, so errors come first and cheaply.

    Neither the output nor its possible external data file (`data_file_of`) may be one
    of the `inputs` or of their external data files, or a `protected` path.
    """
    o = Path(out)
    target = o.resolve()
    guarded: dict[Path, str] = {q: "a file the tool must not overwrite" for q in protected}
    for i in inputs:
        files = model_files(i)
        for f in files:
            guarded[f] = f"the input {i}" if f == Path(i).resolve() else f"an external data file of the input {i}"
    if target in guarded:
        raise UserError(f"{o}: output path is {guarded[target]}; inputs are never overwritten, choose another path")
    data = data_file_of(o)
    if data in guarded:
        raise UserError(f"{o}: its external data file {data.name} would overwrite {guarded[data]}; "
                        "choose another output path")
    parent = target.parent
    if not parent.is_dir():
        raise UserError(f"{o}: output directory {parent} does not exist")
    if o.is_dir():
        raise UserError(f"{o}: is a directory; give a file name for the output model")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts): try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UserError(f"{o}: output directory {parent} is not writable ({exc.strerror or exc})") from None
    return o


_MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")
_GRAPH_FIELDS = ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation")


def write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, location: str,
                   copy_staged: bool = True) -> None:
    """Write `model` with its large tensors in `data_path`, without changing or copying `model`.

    A weight-free skeleton of the model is built field by field; each large
    in-memory tensor's bytes go straight to the data file (one tensor at a time),
    and staged tensors (`onnxopt.weights`) are copied file to file, or with
    `copy_staged=False` left pointing at the staging directory (session models
    written there). Tensors start at page boundaries, so the file can be mapped.
    """
    from onnx import numpy_helper

    skeleton = onnx.ModelProto()
    for f in _MODEL_FIELDS:
        setattr(skeleton, f, getattr(model, f))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.metadata_props.extend(model.metadata_props)
    skeleton.functions.extend(model.functions)
    src, g = model.graph, skeleton.graph
    g.name, g.doc_string = src.name, src.doc_string
    for f in _GRAPH_FIELDS:
        getattr(g, f).extend(getattr(src, f))
    with open(data_path, "wb") as data:
        for t in src.initializer:
            if weights.is_external(t):
                if not copy_staged:
                    g.initializer.append(t)
                    continue
                offset, length = weights.copy_range(t, data), weights.external_nbytes(t)
            else:
                raw = t.raw_data if t.HasField("raw_data") else None
                if raw is None and t.data_type != onnx.TensorProto.STRING:
                    raw = numpy_helper.to_array(t).tobytes() if _tensor_elems(t) * 4 >= EXTERNAL_THRESHOLD else None
                if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                    g.initializer.append(t)
                    continue
                offset, length = weights.pad_to_page(data), len(raw)
                data.write(raw)
                del raw
            ext = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            weights.set_external(ext, location, offset, length)
    with open(model_path, "wb") as f:
        f.write(skeleton.SerializeToString(deterministic=True))


def _tensor_elems(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


#: Errors of a full disk or quota: the user's to fix, not an internal error.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
               protected: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """Write `model` atomically; external data when asked, when the model exceeds 2 GB, or when its
    weights are staged on disk (big models, `onnxopt.weights`).

    The external data file is named `<model file name>.data` beside the model. A
    symlinked `path` is written at its target, so model and data land together and
    the rename never crosses devices. Neither file may be one of the `protected`
    paths (the input model and its data). A full disk is a `UserError`; nothing is
    left half-written and no temporary directory remains.
    """
    out = check_output_path(path, protected=protected)
    target = out.resolve()
    if weights.has_external(model):  # staged weights (onnxopt.weights) go file to file, never back into memory
        external_data = True
    elif external_data is None:
        external_data = model_nbytes(model) >= TWO_GB - 2**26
    parent = target.parent
    data_name = target.name + ".data"
    if external_data:
        check_data_beside(out)
    tmpdir: Path | None = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=parent))
        tmp_model = tmpdir / target.name
        if external_data:
            write_external(model, tmp_model, tmpdir / data_name, data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        with _signals_deferred():  # model and data are replaced as a pair, never one without the other
            if external_data:
                os.replace(tmpdir / data_name, parent / data_name)
            os.replace(tmp_model, target)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise UserError(f"{out}: cannot write the model: {exc.strerror or 'no space left'} in {parent}; "
                            "nothing was written (free some space or choose another -o)") from None
        raise
    finally:
        if tmpdir is not None:
            with _signals_deferred():
                shutil.rmtree(tmpdir, ignore_errors=True)
    return out


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for the duration (main thread only), so cleanup is not cut short; a
    signal that arrived meanwhile is raised again right after, to its own handler. (Python-level
    handlers, not a signal mask: onnxruntime's threads would take a masked process signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old = signal.getsignal(sig)
        if old is not None:  # None: a handler installed outside Python, left alone
            held[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, old in held.items():
            signal.signal(sig, old)
        for sig in pending:
            signal.raise_signal(sig)


# ---- the save gate -------------------------------------------------------------------------------
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
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                     for d in tt.shape.dim)  # dim_value -1 (some exporters): a dynamic axis
    return ValueSignature(vi.name, "tensor", tt.elem_type, dims)


def signature(model: onnx.ModelProto) -> Signature:
    """The signature of a model's main graph (see `Signature`).

    From IR 4 on, an initializer listed as a graph input is an overridable default and part of the
    signature; below IR 4 every initializer had to be listed, and those are constants, not inputs.
    """
    inits = {t.name for t in model.graph.initializer} if model.ir_version < 4 else set()
    return Signature(tuple(_value_signature(v) for v in model.graph.input if v.name not in inits),
                     tuple(_value_signature(v) for v in model.graph.output))


def _dim_text(dims: tuple[Dim, ...] | None) -> str:
    return "no shape" if dims is None else "[" + ", ".join("?" if d is None else repr(d) if isinstance(d, str)
                                                            else str(d) for d in dims) + "]"


def _value_changes(ref: ValueSignature, new: ValueSignature, what: str, pins: tuple[int, ...] | None,
                   pinned: bool) -> list[str]:
    """Differences of one input/output. `pins`: the pinned shape of this input; `pinned`: shapes were pinned
    at all, so a symbolic or unknown dimension may have become concrete (outputs follow their inputs)."""
    where = f"{what} '{ref.name}'"
    if ref.kind != new.kind or ref.detail != new.detail:
        return [f"{where}: type changed ({ref.kind} -> {new.kind})"]
    if ref.elem_type != new.elem_type:
        return [f"{where}: dtype {onnx.TensorProto.DataType.Name(ref.elem_type)} became "
                f"{onnx.TensorProto.DataType.Name(new.elem_type)}"]
    if ref.dims is None:
        return []
    if new.dims is None or len(new.dims) != len(ref.dims):
        return [f"{where}: shape {_dim_text(ref.dims)} became {_dim_text(new.dims)}"]
    for k, (r, n) in enumerate(zip(ref.dims, new.dims)):
        if r == n:
            continue
        if isinstance(n, int) and not isinstance(r, int):
            ok = (pins[k] == n) if pins is not None and k < len(pins) else pinned
        else:
            ok = r is None and isinstance(n, str)  # an unknown axis given a symbolic name loses nothing
        if not ok:
            return [f"{where}: shape {_dim_text(ref.dims)} became {_dim_text(new.dims)}"]
    return []


def signature_changes(ref: Signature, new: Signature, pinned: dict[str, tuple[int, ...]] | None = None
                      ) -> list[str]:
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
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError and friends
        return _first_line(exc)
    return None


def _load_error(model: onnx.ModelProto) -> str | None:
    from onnxopt.runtime import make_session

    try:
        make_session(model)
    except Exception as exc:  # noqa: BLE001 - any onnxruntime load failure
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
    err = _checker_error(model, full=True)
    if err is not None:
        orig = reference.original() if reference is not None else None
        if orig is None or _checker_error(orig, full=True) is None or _checker_error(model, full=False) is not None:
            raise GateFailed(f"onnx.checker rejects the optimized model: {err}", model)
    if reference is not None:
        problems = signature_changes(reference.signature, signature(model), reference.pinned)
        if problems:
            raise GateFailed("the optimized model changed the signature: " + "; ".join(problems[:3])
                             + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""), model)
    err = _load_error(model)
    if err is not None:
        orig = reference.original() if reference is not None else None
        if orig is None or _load_error(orig) is None:
            raise GateFailed(f"onnxruntime cannot load the optimized model: {err}", model)
