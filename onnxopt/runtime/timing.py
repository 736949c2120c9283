"""Latency measurement on onnxruntime: interleaved runs, medians, and a disk cache by key.

Passes that must never make a model slower (quantize, lowrank) time the float
and rewritten forms of one layer shape here and decide with `TimingCache.compare`:
repeated interleaved measurements and a confidence interval of their ratio
(`onnxopt.runtime.decide`), so a decision is taken only beyond the noise. Results
are cached on disk by a key the caller builds from the layer's shape and options,
in a file per onnxruntime version, thread count and CPU.
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
from onnxopt.runtime import decide
from onnxopt.runtime.decide import Comparison
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


#: Version of the cache files' layout: v2 entries of two models add their ratio's interval; files
#: of single-shot timings (v1) are not read.
CACHE_LAYOUT = "v2"


class TimingCache:
    """A JSON file of {key: [seconds, ...]} shared by the passes that time layer variants, one per
    onnxruntime version, thread count and CPU (`cpu_fingerprint`). An entry of two models holds
    their median seconds, then the median of the second's per-repetition ratios to the first and
    its interval: [base, cand, ratio, low, high]; an entry
    of medians alone (put by a caller that knows them) is taken as exact."""

    def __init__(self, name: str, path: Path | None = None, threads: int = 2):
        self.path = path or cache_dir() / (
            f"timing-{name}-{CACHE_LAYOUT}-ort{ort.__version__}-t{threads}-cpu{cpu_fingerprint()}.json"
        )
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
        """Median seconds per run of `models` under `key`, cached; measured by `decide.measure`
        (repeated interleaved blocks, more repetitions while two models' ratio is undecided)."""
        hit = self.get(key)
        if hit is not None and len(hit) in (len(models), len(models) + 3 * (len(models) == 2)):
            return hit[: len(models)]
        reps = decide.measure(models, feeds, runs=runs, threads=self.threads)
        values = reps.medians()
        if len(models) == 2:
            c = reps.comparison()
            self.put(key, values + [c.ratio, c.low, c.high])
        else:
            self.put(key, values)
        return values

    def compare(
        self, key: str, models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int = 20
    ) -> Comparison:
        """The second model's run time against the first's (`Comparison`), cached under `key`: the
        median per-repetition ratio and its confidence interval that `measure` stored (exact
        where the entry holds the two medians alone)."""
        values = self.measure(key, models, feeds, runs=runs)
        hit = self.get(key)
        return comparison_of(hit if hit is not None and hit[:2] == values else values)


def comparison_of(entry: list[float]) -> Comparison:
    """The `Comparison` a cache entry of two models holds: [base, cand] is exact, [base, cand,
    ratio, low, high] carries the measured median ratio and its interval."""
    if len(entry) == 5:
        return Comparison(*entry[2:])
    return Comparison.exact(*entry[:2])
