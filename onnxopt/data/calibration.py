"""Calibration: run the float model on the data and stream statistics of chosen tensors.

Used by every pass that needs data (quantize, prune, lowrank). Each sample runs
once through onnxruntime with the observed tensors exposed as extra outputs;
each observer is updated and the arrays dropped, so memory stays flat as the
sample count grows and input shapes may vary between samples. Observers are
mergeable (`onnxopt.kernels.observers`), so shards of the data can be observed
separately and merged into the same result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from onnxopt.data.observe import observe
from onnxopt.data.samples import Sample
from onnxopt.data.sharded_calibration import sharded_observe
from onnxopt.ir.graph import model_hash
from onnxopt.kernels.bias_correction import ChannelMeanObserver
from onnxopt.kernels.observers import HistogramObserver
from onnxopt.paths import cache_dir
from onnxopt.runtime.executor import Executor


def _stats_cache_path(model: onnx.ModelProto, data_key: str, max_bins: int) -> Path:
    """Where the statistics of `model` on data `data_key` are cached (by content hashes)."""
    return cache_dir() / f"calib-{model_hash(model)[:16]}-{data_key}-b{max_bins}.json"


def activation_histograms(
    model: onnx.ModelProto,
    data: Iterable[Sample],
    tensors: list[str],
    max_bins: int = 2048,
    cache: bool = True,
    desc: str = "calibrating",
    shapes: dict[str, tuple[int, ...]] | None = None,
    executor: Executor | None = None,
) -> dict[str, HistogramObserver]:
    """Exactly mergeable histograms (with exact min/max) of `tensors`, cached on disk.

    The cache key is the model's content hash and the data's fingerprint
    (`CalibrationData.fingerprint()`, or a hash of the samples), so a second
    run on the same model and data reads the file instead of running the model;
    tensors missing from the cache are observed and added. One histogram per
    tensor serves every range method (minmax, percentile, entropy, mse).
    `shapes`, if given, receives each tensor's shape on the first sample
    (for timing and MAC counts where static shape inference gives up).
    With an `onnxopt.runtime.executor.Executor` of more than one worker, the samples are
    observed in shards there and merged (`onnxopt.data.sharded_calibration`): the
    same histograms and shapes, bit for bit.
    """
    samples, data_key = _data_key(data)
    path = _stats_cache_path(model, data_key, max_bins)
    stored = _read_cache(path) if cache else {}
    result = {t: HistogramObserver.from_dict(stored[t]) for t in tensors if t in stored}
    first_shapes = {t: tuple(v) for t, v in stored.get("__shapes__", {}).items()}
    missing = [t for t in tensors if t not in result or t not in first_shapes]
    if missing:
        fresh = _observe_histograms(model, samples, missing, max_bins, desc, executor)
        for t, o in fresh.items():
            if o.shape is not None:
                first_shapes.setdefault(t, o.shape)
        result.update({t: o.hist for t, o in fresh.items()})
        if cache:
            stored.update({t: o.hist.to_dict() for t, o in fresh.items()})
            stored["__shapes__"] = {t: list(v) for t, v in first_shapes.items()}
            _write_cache(path, stored)
    if shapes is not None:
        shapes.update({t: first_shapes[t] for t in tensors if t in first_shapes})
    return result


def _observe_histograms(
    model: onnx.ModelProto,
    samples: Iterable[Sample],
    tensors: list[str],
    max_bins: int,
    desc: str,
    executor: Executor | None,
) -> dict[str, _ShapeRecorder]:
    """Histograms (with first-sample shapes) of `tensors`: in shards on `executor` if it has workers, else here."""
    if executor is not None and executor.workers > 1:
        merged = sharded_observe(model, samples, tensors, executor, _ShapeRecorders(max_bins), desc=desc)
        return cast("dict[str, _ShapeRecorder]", merged)  # the observers `_ShapeRecorders` made
    total = len(samples) if isinstance(samples, Sized) else None
    return observe(model, samples, tensors, _ShapeRecorders(max_bins), desc=desc, total=total)


def channel_means(
    model: onnx.ModelProto,
    data: Iterable[Sample],
    axes: dict[str, int],
    cache: bool = True,
    desc: str = "calibrating means",
) -> dict[str, ChannelMeanObserver]:
    """Per-channel means of tensors (`{name: channel axis}`), streamed and cached on disk like the histograms."""
    samples, data_key = _data_key(data)
    path = _stats_cache_path(model, data_key, 0).with_name(f"means-{model_hash(model)[:16]}-{data_key}.json")
    stored = _read_cache(path) if cache else {}
    key = {t: f"{t}@{a}" for t, a in axes.items()}
    result = {t: ChannelMeanObserver.from_dict(stored[key[t]]) for t in axes if key[t] in stored}
    missing = sorted(t for t in axes if t not in result)
    if missing:
        total = len(samples) if isinstance(samples, Sized) else None
        fresh = observe(model, samples, missing, lambda t: ChannelMeanObserver(axes[t]), desc=desc, total=total)
        result.update(fresh)
        if cache:
            stored.update({key[t]: o.to_dict() for t, o in fresh.items()})
            _write_cache(path, stored)
    return result


def _data_key(data: Iterable[Sample]) -> tuple[Iterable[Sample], str]:
    """The data (re-iterable) and its fingerprint: `CalibrationData.fingerprint()` or a hash of the samples."""
    if hasattr(data, "fingerprint"):
        return data, data.fingerprint()
    samples = list(data)
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            h.update(k.encode() + str(s[k].shape).encode() + np.ascontiguousarray(s[k]).tobytes())
    return samples, h.hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, stored: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs time


class _ShapeRecorder:
    """A histogram observer that also remembers the tensor's shape on its first sample.

    Mergeable like the histogram: shards merged in order keep the first shard's shape."""

    def __init__(self, max_bins: int):
        self.shape: tuple[int, ...] | None = None
        self.hist = HistogramObserver(max_bins=max_bins)

    def update(self, x: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(int(d) for d in np.shape(x))
        self.hist.update(x)

    def merge(self, other: _ShapeRecorder) -> _ShapeRecorder:
        if self.shape is None:
            self.shape = other.shape
        self.hist.merge(other.hist)
        return self


@dataclass(frozen=True)
class _ShapeRecorders:
    """A picklable `make_observer` of `_ShapeRecorder`s (it reaches executor workers)."""

    max_bins: int

    def __call__(self, tensor: str) -> _ShapeRecorder:
        return _ShapeRecorder(self.max_bins)
