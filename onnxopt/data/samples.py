"""Calibration and check data: one format in, checked against the model's inputs.

Accepted: a directory of `.npz` files (one sample per file, keys = model input
names; shapes may differ between samples), one `.npz` whose arrays carry a
leading sample axis, or from Python any iterable of `{input_name: ndarray}`.
Samples are read lazily, one at a time, so memory stays flat.
"""

from __future__ import annotations

import copy
import hashlib
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxopt.analysis.shapes import concrete_input_shapes, numpy_dtype
from onnxopt.errors import UserError

Sample = dict[str, np.ndarray]

NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What `np.load` raises for a file that is not a readable `.npz` (truncated, not a zip, pickled data)."""


def value_kind(t: onnx.TypeProto) -> tuple[str, onnx.TypeProto.Tensor | None]:
    """What a graph input/output holds: ("tensor" | "sequence" | "optional" | other kind, its tensor type).

    A sequence or optional of a tensor gives that tensor's type; other kinds
    (map, sequence of sequences, sparse) give None.
    """
    kind = t.WhichOneof("value") or "tensor_type"
    if kind == "tensor_type":
        return "tensor", t.tensor_type
    inner = (
        t.sequence_type.elem_type
        if kind == "sequence_type"
        else t.optional_type.elem_type
        if kind == "optional_type"
        else None
    )
    name = kind.removesuffix("_type")
    if inner is not None and inner.WhichOneof("value") == "tensor_type":
        return name, inner.tensor_type
    return name, None


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple]]:
    """Real (non-initializer) inputs: name -> (numpy dtype, dims with None/str for dynamic axes).

    A sequence or optional input gives its tensor element's dtype and dims (see
    `value_kind`); one whose element is not a tensor gives dtype object and no dims.
    """
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, tuple[np.dtype, tuple]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        _, tt = value_kind(inp.type)
        if tt is None or not tt.elem_type:
            out[inp.name] = (np.dtype(object), ())
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[inp.name] = (numpy_dtype(tt.elem_type), dims)
    return out


def _check_npz(p: Path) -> None:
    """One clear line for a `.npz` that is empty, not a zip archive, or holds no arrays."""
    size = p.stat().st_size if p.is_file() else -1
    if size == 0:
        raise UserError(f"{p}: empty file, not a .npz archive (write samples with numpy.savez)")
    if size < 0 or not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not a .npz archive (not a zip file); write samples with numpy.savez")
    try:
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{p}: cannot read the .npz archive ({exc})") from None
    if not names:
        raise UserError(f"{p}: the .npz archive holds no arrays (write samples with numpy.savez)")


class CalibrationData:
    """A re-iterable, validated source of samples for calibration, checks and validation."""

    def __init__(
        self,
        source: str | os.PathLike | Iterable[Sample],
        model: onnx.ModelProto | None = None,
        limit: int | None = None,
    ):
        self.source = source
        self.limit = limit
        self.inputs = model_inputs(model) if model is not None else None
        self._paths: list[Path] | None = None
        self._stacked: Path | None = None
        self._items: list[Sample] | None = None
        if isinstance(source, (str, os.PathLike)):
            p = Path(source)
            if not p.exists():
                raise UserError(f"{p}: calibration data not found (give a directory of .npz files or one .npz)")
            if p.is_dir():
                self._paths = sorted(p.glob("*.npz"))
                if not self._paths:
                    raise UserError(f"{p}: no .npz files in the calibration directory")
                for f in self._paths:
                    _check_npz(f)
            elif p.suffix == ".npz" or zipfile.is_zipfile(p):
                _check_npz(p)
                self._stacked = p
            else:
                raise UserError(f"{p}: calibration data must be a directory of .npz files or one .npz file")
        else:
            self._items = list(source)
            if not self._items:
                raise UserError("calibration data is empty")
        first = next(iter(self))  # validates the first sample eagerly, so errors come before any work
        del first

    def __len__(self) -> int:
        if self._paths is not None:
            n = len(self._paths)
        elif self._items is not None:
            n = len(self._items)
        else:
            with np.load(self._npz()) as z:
                n = min(z[k].shape[0] for k in z.files) if z.files else 0
        return min(n, self.limit) if self.limit else n

    def _npz(self) -> Path:
        """The one `.npz` of stacked samples, for data that is neither a directory nor in-memory samples."""
        assert self._stacked is not None, "neither a directory nor in-memory samples: a stacked .npz"
        return self._stacked

    def __iter__(self) -> Iterator[Sample]:
        n = len(self)
        for i, sample in enumerate(self._raw()):
            if i >= n:
                return
            yield self._check(sample, i)

    def _raw(self) -> Iterator[Sample]:
        if self._items is not None:
            yield from self._items
        elif self._paths is not None:
            for p in self._paths:
                try:
                    with np.load(p, allow_pickle=False) as z:
                        yield {k: z[k] for k in z.files}
                except NPZ_ERRORS as exc:
                    raise UserError(f"{p}: cannot read calibration sample ({exc})") from None
        else:
            try:
                z = np.load(self._npz(), allow_pickle=False)
            except NPZ_ERRORS as exc:
                raise UserError(f"{self._stacked}: cannot read calibration data ({exc})") from None
            with z:
                for k in z.files:
                    if z[k].ndim == 0:
                        raise UserError(f"{self._stacked}: array '{k}' has no leading sample axis")
                for i in range(min(z[k].shape[0] for k in z.files)):
                    yield {k: z[k][i] for k in z.files}

    def _check(self, sample: Sample, index: int) -> Sample:
        """`sample` checked against the model's inputs: names, dtypes (floats cast), shapes, finite values."""
        if self.inputs is None:
            return sample
        where = f"calibration sample {index}"
        names = set(self.inputs)
        missing, extra = names - set(sample), set(sample) - names
        if missing or extra:
            raise UserError(
                f"{where}: input names {sorted(sample)} do not match the model's inputs {sorted(names)}"
                + (f" (missing {sorted(missing)})" if missing else "")
                + (f" (unknown {sorted(extra)})" if extra else "")
            )
        return {name: self._check_input(where, name, sample[name]) for name in self.inputs}

    def _check_input(self, where: str, name: str, value: np.ndarray) -> np.ndarray:
        """One input of a sample, with the sample axis added for stacked data and floats cast to the model's."""
        assert self.inputs is not None, "only _check calls this, with the model's inputs known"
        dtype, dims = self.inputs[name]
        arr = np.asarray(value)
        if self._stacked is not None and arr.ndim == len(dims) - 1:
            arr = arr[None]
        if arr.dtype != dtype:
            if arr.dtype.kind != "f" or dtype.kind != "f":
                raise UserError(f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}")
            arr = arr.astype(dtype)
        if arr.ndim != len(dims) or any(_fixed(d) and d != s for d, s in zip(dims, arr.shape)):
            shown = [d if _fixed(d) else "?" for d in dims]
            raise UserError(f"{where}: input '{name}' has shape {list(arr.shape)}, the model expects {shown}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{where}: input '{name}' contains NaN or Inf values")
        return arr

    def subset(self, start: int, stop: int) -> CalibrationData:
        """Samples [start, stop) as a CalibrationData (a directory reads only their files), for sharded work."""
        part = copy.copy(self)
        stop = min(stop, len(self))
        if self._paths is not None:
            part._paths = self._paths[start:stop]
        elif self._items is not None:
            part._items = self._items[start:stop]
        else:
            with np.load(self._npz(), allow_pickle=False) as z:
                arrays = {k: z[k][start:stop] for k in z.files}
            part._items = [{k: v[i] for k, v in arrays.items()} for i in range(stop - start)]
        part.limit = None
        return part

    def fingerprint(self) -> str:
        """Hash of the data's bytes (for caching statistics on disk)."""
        h = hashlib.sha256()
        for s in self:
            for k in sorted(s):
                h.update(k.encode())
                h.update(str(s[k].shape).encode())
                h.update(np.ascontiguousarray(s[k]).tobytes())
        return h.hexdigest()[:16]


def _fixed(dim: object) -> bool:
    """A dimension with a known size (not symbolic, not -1/0)."""
    return isinstance(dim, int) and dim > 0


def parse_input_values(specs: list[str] | None) -> dict[str, np.ndarray] | None:
    """`["sr=16000", "mask=1,0,1"]` -> `{"sr": array(16000), "mask": array([1, 0, 1])}` (`--input-value`).

    A single number is a scalar, a comma list a 1-D array; `seeded_inputs` casts
    it to the input's dtype and broadcasts it to the input's shape.
    """
    if not specs:
        return None
    values: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            nums = (
                [int(v) if v.strip().lstrip("+-").isdigit() else float(v) for v in text.split(",")]
                if sep and name and text
                else None
            )  # integers stay exact (int64 beyond 2**53)
        except ValueError:
            nums = None
        if nums is None:
            raise UserError(f"--input-value {spec!r}: write NAME=VALUE or NAME=V1,V2,..., e.g. sr=16000")
        if name in values:
            raise UserError(f"--input-value: '{name}' is given twice")
        values[name] = np.array(nums[0] if len(nums) == 1 and "," not in text else nums)
    return values


def _fixed_value(name: str, value: np.ndarray, shape: tuple[int, ...], declared: tuple, dtype: np.dtype) -> np.ndarray:
    """A user-given input value (`--input-value`) as the input's dtype, broadcast to its shape; a list
    sets the length of a dynamic last axis. A value that fits neither is a UserError."""
    v = np.asarray(value)
    if dtype.kind in "iub" and not np.all(np.mod(v, 1) == 0):
        raise UserError(f"--input-value {name}: the input is {dtype}, give whole numbers")
    v = v.astype(dtype)
    if v.ndim == 1 and shape and declared and not (isinstance(declared[-1], int) and declared[-1] > 0):
        shape = (*shape[:-1], v.shape[0])
    try:
        return np.broadcast_to(v, shape).copy()
    except ValueError:
        raise UserError(f"--input-value {name}: {v.size} value(s) do not fit the input's shape {list(shape)}") from None


def _random(rng: np.random.Generator, name: str, dt: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, 4, shape).astype(dt)
    raise UserError(f"input '{name}' has dtype {dt}: cannot make random data for it; give calibration data")


def _element_shape(tt: onnx.TypeProto.Tensor, first_dim: int, default_dim: int = 64) -> tuple[int, ...]:
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
    return tuple(d if d is not None else (first_dim if k == 0 else default_dim) for k, d in enumerate(dims))


def seeded_inputs(
    model: onnx.ModelProto,
    n: int,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    values: dict[str, np.ndarray] | None = None,
) -> list[Sample]:
    """`n` random samples matching the model's input dtypes and (pinned) shapes.

    Floats are standard normal, integers small non-negative values, bools random;
    `values` fixes inputs (control inputs such as a sample rate, `--input-value`).
    A sequence input gets a list of two random tensors, an optional input its
    tensor. Random inputs are weak evidence for accuracy; use real data where it exists.
    """
    rng = np.random.default_rng(seed)
    values = values or {}
    inputs = model_inputs(model)
    unknown = sorted(set(values) - set(inputs))
    if unknown:
        raise UserError(f"--input-value: the model has no input {unknown} (its inputs: {sorted(inputs)})")
    inits = {i.name for i in model.graph.initializer}
    kinds = {i.name: value_kind(i.type) for i in model.graph.input if i.name not in inits}
    tensor_inputs = {k for k, (kind, _) in kinds.items() if kind == "tensor"}
    shapes = {k: v for k, v in concrete_input_shapes(model, input_shapes).items() if k in tensor_inputs}
    samples = []
    for _ in range(n):
        s: dict = {}
        for name, (kind, tt) in kinds.items():
            dt = inputs[name][0]
            if kind == "tensor":
                shape = shapes[name]
                s[name] = (
                    _fixed_value(name, values[name], shape, inputs[name][1], dt)
                    if name in values
                    else _random(rng, name, dt, shape)
                )
            elif kind in ("sequence", "optional") and tt is not None and tt.elem_type:
                elem = _element_shape(tt, 1)
                s[name] = (
                    [_random(rng, name, dt, elem) for _ in range(2)]
                    if kind == "sequence"
                    else _random(rng, name, dt, elem)
                )
            else:
                raise UserError(f"input '{name}' is a {kind}: cannot make random data for it; give calibration data")
        samples.append(s)
    return samples
