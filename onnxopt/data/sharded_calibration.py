"""Calibration over shards of the data through an executor, merged into single-process statistics.

The samples are cut into contiguous shards of indices; each task runs
`onnxopt.data.observe.observe` over its shard and returns its observers; the
driver merges them in shard order. The kernels' observers merge exactly, so
the statistics (and every range computed from them) are bit-identical to one
`observe` over all the data, whatever the executor and the number of shards.

The model travels once through `Executor.share` (Ray's object store or one
temporary file), data on disk by path (each task reads only its own files), and
in-memory samples once through `Executor.share`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxopt.data.observe import MergeableObserver, observe
from onnxopt.data.samples import CalibrationData, Sample
from onnxopt.kernels.observers import HistogramObserver, MinMaxObserver
from onnxopt.runtime.executor import Executor, LocalExecutor, Shared


@dataclass(frozen=True)
class ObserverFactory:
    """A picklable `make_observer`: `kind` 'histogram' (with `max_bins`) or 'minmax' (with `axis`)."""

    kind: str = "histogram"
    max_bins: int = 2048
    axis: int | None = None

    def __call__(self, tensor: str) -> MergeableObserver:
        if self.kind == "histogram":
            return HistogramObserver(max_bins=self.max_bins)
        if self.kind == "minmax":
            return MinMaxObserver(axis=self.axis)
        raise ValueError(f"unknown observer kind '{self.kind}' (histogram or minmax)")


@dataclass
class _Shard:
    """One task: observe `tensors` of the shared model on samples [start, stop)."""

    model: Shared
    data: Shared | str
    start: int
    stop: int
    tensors: list[str]
    make_observer: Any
    threads: int


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous [start, stop) ranges covering 0..n as evenly as possible (none empty)."""
    shards = max(1, min(shards, n))
    edges = [n * k // shards for k in range(shards + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _observe_shard(task: _Shard) -> dict[str, MergeableObserver]:
    model = task.model.get()
    if isinstance(task.data, str):
        samples: Iterable[Sample] = CalibrationData(task.data, model).subset(task.start, task.stop)
    else:
        samples = task.data.get()[task.start : task.stop]
    return observe(
        model,
        samples,
        task.tensors,
        task.make_observer,
        desc=f"shard {task.start}-{task.stop}",
        total=task.stop - task.start,
        threads=task.threads,
    )


def sharded_observe(
    model: onnx.ModelProto,
    data: CalibrationData | str | os.PathLike | Iterable[Sample],
    tensors: list[str],
    executor: Executor | None = None,
    make_observer: Any = ObserverFactory(),
    shards: int | None = None,
    desc: str = "calibrating",
    threads: int = 2,
) -> dict[str, MergeableObserver]:
    """`observe(model, data, tensors, make_observer)` split into shards run by `executor`, then merged.

    `make_observer(tensor)` must be picklable (an `ObserverFactory`, not a
    lambda) and build mergeable observers. `shards` defaults to 4 per worker
    (1 in-process), for load balance and cheap retries. Every task runs
    onnxruntime with `threads` intra-op threads, whatever the executor: its
    results can change with the thread count (PP-OCR det's convolutions do), so
    bit-identity with `observe(..., threads=threads)` needs the same count.
    Returns {tensor: observer}.
    """
    executor = executor or LocalExecutor(1)
    if not isinstance(data, CalibrationData):
        data = CalibrationData(data, model)
    n = len(data)
    if shards is None:
        shards = 1 if executor.workers == 1 else 4 * executor.workers
    if isinstance(data.source, (str, os.PathLike)):
        source: Shared | str = str(Path(data.source).resolve())
    else:
        source = executor.share(list(data))
    shared_model = executor.share(model)
    tasks = [
        _Shard(shared_model, source, a, b, list(tensors), make_observer, threads) for a, b in shard_bounds(n, shards)
    ]
    parts = executor.map(_observe_shard, tasks, desc=desc, unit="shard")
    merged = parts[0]
    for part in parts[1:]:
        for name in tensors:
            merged[name].merge(part[name])
    return merged
