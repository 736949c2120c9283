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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.graph import model_hash
from onnxopt.kernels.bias_correction import ChannelMeanObserver
from onnxopt.kernels.observers import HistogramObserver
from onnxopt.progress import progress
from onnxopt.runtime import make_session, session_options
from onnxopt.shapes import infer_tensor_info


class Observer(Protocol):
    """Anything with `update(array)`; the kernels' observers also `merge`."""

    def update(self, x: np.ndarray) -> Any: ...


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (typed from shape inference where known)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    info = infer_tensor_info(model)
    for name in tensors:
        if name in existing:
            continue
        ti = info.get(name)
        vi = onnx.helper.make_tensor_value_info(name, ti.elem_type, None) if ti and ti.elem_type else \
            onnx.ValueInfoProto(name=name)
        out.graph.output.append(vi)
        existing.add(name)
    return out


def observe(model: onnx.ModelProto, samples: Iterable[Sample], tensors: list[str],
            make_observer: Callable[[str], Observer], desc: str = "calibrating", total: int | None = None,
            threads: int = 2, chunk: int = 256) -> dict[str, Observer]:
    """Stream `samples` through `model` and feed each observed tensor to its own observer.

    Tensors are exposed in chunks of `chunk` per session, so a model with many
    large activations does not hold them all at once; with one chunk the data is
    read once. The observers of one sample are updated on a single helper
    thread while onnxruntime (which releases the GIL) runs the next sample, so
    updates keep the sample order (same statistics) and at most two samples'
    outputs are alive at once. Returns {tensor name: observer}.
    """
    observers = {t: make_observer(t) for t in tensors}
    graph_outputs = [o.name for o in model.graph.output]
    groups = [tensors[i:i + chunk] for i in range(0, len(tensors), chunk)] or [[]]
    for gi, group in enumerate(groups):
        so = session_options(threads, optimize=False)
        # idle onnxruntime threads would spin against the updater thread for the same cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = make_session(with_outputs(model, group), so=so)
        names = list(dict.fromkeys(group + [o for o in graph_outputs if o in observers]))
        label = desc if len(groups) == 1 else f"{desc} ({gi + 1}/{len(groups)})"
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[None] | None = None
            for feeds in progress(samples, label, total=total, unit="sample"):
                values = sess.run(names, feeds)
                if pending is not None:
                    pending.result()
                pending = pool.submit(_update_all, observers, names, values)
            if pending is not None:
                pending.result()
    return observers


def _update_all(observers: dict[str, Observer], names: list[str], values: list[np.ndarray]) -> None:
    """Feed one sample's outputs to their observers (in `names` order, on the single updater thread)."""
    for name, value in zip(names, values):
        observers[name].update(value)


def _stats_cache_path(model: onnx.ModelProto, data_key: str, max_bins: int) -> Path:
    """Where the statistics of `model` on data `data_key` are cached (by content hashes)."""
    from onnxopt.paths import cache_dir
    return cache_dir() / f"calib-{model_hash(model)[:16]}-{data_key}-b{max_bins}.json"


def activation_histograms(model: onnx.ModelProto, data: Iterable[Sample], tensors: list[str],
                          max_bins: int = 2048, cache: bool = True, desc: str = "calibrating",
                          shapes: dict[str, tuple[int, ...]] | None = None,
                          executor: Any = None) -> dict[str, HistogramObserver]:
    """Exactly mergeable histograms (with exact min/max) of `tensors`, cached on disk.

    The cache key is the model's content hash and the data's fingerprint
    (`CalibrationData.fingerprint()`, or a hash of the samples), so a second
    run on the same model and data reads the file instead of running the model;
    tensors missing from the cache are observed and added. One histogram per
    tensor serves every range method (minmax, percentile, entropy, mse).
    `shapes`, if given, receives each tensor's shape on the first sample
    (for timing and MAC counts where static shape inference gives up).
    With an `onnxopt.executor.Executor` of more than one worker, the samples are
    observed in shards there and merged (`onnxopt.sharded_calibration`): the
    same histograms and shapes, bit for bit.
    """
    samples, data_key = _data_key(data)
    path = _stats_cache_path(model, data_key, max_bins)
    stored = _read_cache(path) if cache else {}
    result = {t: HistogramObserver.from_dict(stored[t]) for t in tensors if t in stored}
    first_shapes = {t: tuple(v) for t, v in stored.get("__shapes__", {}).items()}
    missing = [t for t in tensors if t not in result or t not in first_shapes]
    if missing:
        total = len(samples) if hasattr(samples, "__len__") else None
        if executor is not None and executor.workers > 1:
            from onnxopt.sharded_calibration import sharded_observe

            fresh = sharded_observe(model, samples, missing, executor, _ShapeRecorders(max_bins), desc=desc)
        else:
            fresh = observe(model, samples, missing, _ShapeRecorders(max_bins), desc=desc, total=total)
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


def channel_means(model: onnx.ModelProto, data: Iterable[Sample], axes: dict[str, int], cache: bool = True,
                  desc: str = "calibrating means") -> dict[str, ChannelMeanObserver]:
    """Per-channel means of tensors (`{name: channel axis}`), streamed and cached on disk like the histograms."""
    samples, data_key = _data_key(data)
    path = _stats_cache_path(model, data_key, 0).with_name(f"means-{model_hash(model)[:16]}-{data_key}.json")
    stored = _read_cache(path) if cache else {}
    key = {t: f"{t}@{a}" for t, a in axes.items()}
    result = {t: ChannelMeanObserver.from_dict(stored[key[t]]) for t in axes if key[t] in stored}
    missing = sorted(t for t in axes if t not in result)
    if missing:
        total = len(samples) if hasattr(samples, "__len__") else None
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

    def merge(self, other: "_ShapeRecorder") -> "_ShapeRecorder":
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
