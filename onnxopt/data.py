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
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from onnxopt.errors import UserError
from onnxopt.shapes import concrete_input_shapes, numpy_dtype

Sample = dict[str, np.ndarray]


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[np.dtype, tuple]]:
    """Real (non-initializer) inputs: name -> (numpy dtype, dims with None/str for dynamic axes)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out[inp.name] = (numpy_dtype(tt.elem_type), dims)
    return out


class CalibrationData:
    """A re-iterable, validated source of samples for calibration, checks and validation."""

    def __init__(self, source: str | os.PathLike | Iterable[Sample], model: onnx.ModelProto | None = None,
                 limit: int | None = None):
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
            elif p.suffix == ".npz" or zipfile.is_zipfile(p):
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
            with np.load(self._stacked) as z:
                n = min(z[k].shape[0] for k in z.files) if z.files else 0
        return min(n, self.limit) if self.limit else n

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
                except Exception as exc:
                    raise UserError(f"{p}: cannot read calibration sample ({exc})") from None
        else:
            try:
                z = np.load(self._stacked, allow_pickle=False)
            except Exception as exc:
                raise UserError(f"{self._stacked}: cannot read calibration data ({exc})") from None
            with z:
                for k in z.files:
                    if z[k].ndim == 0:
                        raise UserError(f"{self._stacked}: array '{k}' has no leading sample axis")
                for i in range(min(z[k].shape[0] for k in z.files)):
                    yield {k: z[k][i] for k in z.files}

    def _check(self, sample: Sample, index: int) -> Sample:
        if self.inputs is None:
            return sample
        where = f"calibration sample {index}"
        names = set(self.inputs)
        missing, extra = names - set(sample), set(sample) - names
        if missing or extra:
            raise UserError(f"{where}: input names {sorted(sample)} do not match the model's inputs {sorted(names)}"
                            + (f" (missing {sorted(missing)})" if missing else "") + (f" (unknown {sorted(extra)})" if extra else ""))
        out = {}
        for name, (dtype, dims) in self.inputs.items():
            arr = np.asarray(sample[name])
            if self._stacked is not None and arr.ndim == len(dims) - 1:
                arr = arr[None]
            if arr.dtype != dtype:
                if arr.dtype.kind == dtype.kind == "f":
                    arr = arr.astype(dtype)
                else:
                    raise UserError(f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}")
            if arr.ndim != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, arr.shape)):
                shown = [d if isinstance(d, int) and d > 0 else "?" for d in dims]
                raise UserError(f"{where}: input '{name}' has shape {list(arr.shape)}, the model expects {shown}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise UserError(f"{where}: input '{name}' contains NaN or Inf values")
            out[name] = arr
        return out

    def subset(self, start: int, stop: int) -> "CalibrationData":
        """Samples [start, stop) as a CalibrationData (a directory reads only their files), for sharded work."""
        part = copy.copy(self)
        stop = min(stop, len(self))
        if self._paths is not None:
            part._paths = self._paths[start:stop]
        elif self._items is not None:
            part._items = self._items[start:stop]
        else:
            with np.load(self._stacked, allow_pickle=False) as z:
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


def seeded_inputs(model: onnx.ModelProto, n: int, seed: int = 0,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[Sample]:
    """`n` random samples matching the model's input dtypes and (pinned) shapes.

    Floats are standard normal, integers small non-negative values, bools random.
    Random inputs are weak evidence for accuracy; use real data where it exists.
    """
    rng = np.random.default_rng(seed)
    shapes = concrete_input_shapes(model, input_shapes)
    dtypes = {k: v[0] for k, v in model_inputs(model).items()}
    samples = []
    for _ in range(n):
        s = {}
        for name, shape in shapes.items():
            dt = dtypes[name]
            if dt.kind == "f":
                s[name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                s[name] = rng.integers(0, 2, shape).astype(dt)
            elif dt.kind in "iu":
                s[name] = rng.integers(0, 4, shape).astype(dt)
            else:
                raise UserError(f"input '{name}' has dtype {dt}: cannot make random data for it; give --data")
        samples.append(s)
    return samples
