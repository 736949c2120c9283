"""Latency measurement on onnxruntime: interleaved runs, medians, and a disk cache by key.

Passes that must never make a model slower (quantize, lowrank) time the float
and rewritten forms of one layer shape here. Runs of the candidates are
interleaved so machine noise hits them alike; results are cached on disk by
a key the caller builds from the layer's shape and options, and the onnxruntime
version, thread count and CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.ir.weights import has_external
from onnxopt.paths import cache_dir
from onnxopt.runtime.sessions import make_session


def median_latencies(
    models: Sequence[onnx.ModelProto | str],
    feeds: dict[str, np.ndarray],
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
) -> list[float]:
    """Median seconds per run of each model on the CPU EP, runs interleaved round-robin.

    Models with weights staged on disk (big models, `onnxopt.weights`) are timed one
    after the other instead, so two sessions never hold their weights at once."""
    if len(models) > 1 and any(isinstance(m, onnx.ModelProto) and has_external(m) for m in models):
        return [median_latencies([m], feeds, runs, warmup, threads)[0] for m in models]
    sessions = [make_session(m, threads=threads) for m in models]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(x) for x in samples]


@functools.cache
def cpu_info() -> dict[str, str]:
    """This CPU's identity from `/proc/cpuinfo` (first entry of "model name", "flags", "Features",
    "CPU part"); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in text.splitlines()):
        if key.strip() in ("model name", "flags", "Features", "CPU part"):
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_fingerprint() -> str:
    """A short hash of this CPU's model name and instruction-set flags (`cpu_info`, else the
    platform): timings from another CPU (say, one without VNNI) must not decide anything here."""
    info = cpu_info()
    ident = json.dumps(sorted(info.items())) if info else platform.machine() + platform.processor()
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


class TimingCache:
    """A JSON file of {key: [seconds, ...]} shared by the passes that time layer variants, one per
    onnxruntime version, thread count and CPU (`cpu_fingerprint`)."""

    def __init__(self, name: str, path: Path | None = None, threads: int = 2):
        self.path = path or cache_dir() / f"timing-{name}-ort{ort.__version__}-t{threads}-cpu{cpu_fingerprint()}.json"
        self.threads = threads
        try:
            self._data: dict[str, list[float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._data = {}

    def get(self, key: str) -> list[float] | None:
        return self._data.get(key)

    def put(self, key: str, values: list[float]) -> None:
        self._data[key] = [float(v) for v in values]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._data, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs time

    def measure(
        self, key: str, models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int = 20
    ) -> list[float]:
        """Cached `median_latencies` of `models` under `key`."""
        hit = self.get(key)
        if hit is not None and len(hit) == len(models):
            return hit
        values = median_latencies(models, feeds, runs=runs, threads=self.threads)
        self.put(key, values)
        return values
