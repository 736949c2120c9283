"""Latency decisions that survive a noisy machine: repeated interleaved measurements and a
confidence test on their ratio.

A decision such as "int8 is faster than float for this layer" is taken only when the interval
of the candidate/baseline ratio lies wholly on one side of the threshold; otherwise the
comparison is undecided and the caller keeps its safer choice (float, unchanged). Measurements
run in repetitions: in each, every session runs a short block alone (one untimed lead-in run
absorbs the previous session's spinning worker threads), in an order that alternates between
repetitions, so slow phases of the machine hit both forms alike and each repetition yields one
paired ratio. Undecided comparisons get more repetitions, up to a limit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.ir.weights import has_external
from onnxopt.kernels.stats_tests import ratio_interval
from onnxopt.runtime.sessions import make_session

log = logging.getLogger(__name__)

#: Timed runs per block; each block also has one untimed lead-in run.
BLOCK = 3
#: Confidence of the interval a decision needs.
CONFIDENCE = 0.95

#: The clock timings are read from (a module attribute, so tests can replace it).
clock: Callable[[], float] = time.perf_counter

_busy_warned: list[bool] = [False]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """candidate / baseline run time: the median ratio and its confidence interval [low, high]."""

    ratio: float
    low: float
    high: float

    @classmethod
    def exact(cls, base: float, cand: float) -> Comparison:
        """The comparison of two timings known without noise (the interval is the point)."""
        r = cand / base if base > 0 else 1.0
        return cls(r, r, r)

    def surely_below(self, limit: float) -> bool:
        """True when the whole interval is under `limit` (the candidate is faster beyond the noise)."""
        return self.high < limit

    def surely_above(self, limit: float) -> bool:
        """True when the whole interval is over `limit` (the candidate is slower beyond the noise)."""
        return self.low > limit

    @property
    def verdict(self) -> str:
        """ "faster", "slower" or "undecided": the candidate against the baseline."""
        if self.surely_below(1.0):
            return "faster"
        if self.surely_above(1.0):
            return "slower"
        return "undecided"

    def describe(self) -> str:
        """The ratio and, when it is not exact, its interval: "0.83x (0.79-0.88)"."""
        if self.low == self.high:
            return f"{self.ratio:.2f}x"
        return f"{self.ratio:.2f}x ({self.low:.2f}-{self.high:.2f})"


@dataclasses.dataclass
class Repetitions:
    """Per model, the median seconds of each repetition's block."""

    samples: list[list[float]]

    def medians(self) -> list[float]:
        """Median seconds per run of each model over the repetitions."""
        return [statistics.median(s) for s in self.samples]

    def comparison(self, confidence: float = CONFIDENCE) -> Comparison:
        """The second model against the first: paired per-repetition ratios and their interval."""
        ratio, low, high = ratio_interval(np.array(self.samples[0]), np.array(self.samples[1]), confidence)
        return Comparison(ratio, low, high)


def machine_busy() -> bool:
    """True when the 1-minute load average exceeds the CPUs this process may use; warns once per
    process, since every latency decision taken then is slower to reach and less certain."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = load > cpus
    if busy and not _busy_warned[0]:
        _busy_warned[0] = True
        log.warning(
            "machine busy (load %.1f on %d CPUs): latency decisions need more repetitions, and those "
            "left undecided keep the safer choice",
            load,
            cpus,
        )
    return busy


def _block(run: Callable[[], object], now: Callable[[], float]) -> float:
    """Median seconds of BLOCK timed runs after one untimed lead-in run."""
    run()
    times = []
    for _ in range(BLOCK):
        t0 = now()
        run()
        times.append(now() - t0)
    return statistics.median(times)


def repeat(
    runners: Sequence[Callable[[], object]],
    reps: int,
    into: Repetitions,
    now: Callable[[], float] | None = None,
) -> None:
    """Add `reps` repetitions to `into`: each runs every runner's block alone, order alternating;
    `now` is the clock (default: the module's `clock`)."""
    now = now or clock
    for _ in range(reps):
        order = range(len(runners)) if len(into.samples[0]) % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            into.samples[i].append(_block(runners[i], now))


def decide_runs(
    runners: Sequence[Callable[[], object]],
    min_reps: int,
    max_reps: int,
    limit: float = 1.0,
    now: Callable[[], float] | None = None,
) -> Repetitions:
    """Repetitions of the runners; for two, more are added (doubling, up to `max_reps`) while the
    second's ratio to the first is not surely below or above `limit`."""
    reps = Repetitions([[] for _ in runners])
    repeat(runners, min_reps, reps, now)
    while len(runners) == 2 and len(reps.samples[0]) < max_reps:
        c = reps.comparison()
        if c.surely_below(limit) or c.surely_above(limit):
            break
        repeat(runners, min(len(reps.samples[0]), max_reps - len(reps.samples[0])), reps, now)
    return reps


def measure(
    models: Sequence[onnx.ModelProto | str],
    feeds: dict[str, np.ndarray],
    runs: int = 20,
    warmup: int = 3,
    threads: int = 2,
) -> Repetitions:
    """Repeated interleaved timings of `models` on the CPU EP, about `runs` runs each (lead-ins
    included; more, up to 3x, while two models' comparison is undecided).

    Models with weights staged on disk are timed one after the other (one session at a time), so
    two sessions never hold their weights at once; their repetitions are paired by index."""
    machine_busy()
    min_reps = max(6, math.ceil(runs / (BLOCK + 1)))
    if len(models) > 1 and any(isinstance(m, onnx.ModelProto) and has_external(m) for m in models):
        out = Repetitions([])
        for m in models:
            out.samples.append(measure([m], feeds, runs, warmup, threads).samples[0])
        return out
    sessions = [make_session(m, threads=threads) for m in models]
    runners = [_runner(s, feeds) for s in sessions]
    for r in runners:
        for _ in range(warmup):
            r()
    return decide_runs(runners, min_reps, 3 * min_reps)


def _runner(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One run of `session` on `feeds`."""
    return lambda: session.run(None, feeds)
