"""Per-layer sensitivity trials through an executor: quantize one layer, measure the model's output SQNR.

The quantize pass decides what a trial is (`passes/quantize.py`: its weights,
biases and Q/DQ placement) and what to do with the results (its serial search
for the layers to keep float); this module only runs the trials and scores
them, so a trial scores the same in the pass, in the tests and in the bench.

A trial is what differs from the float model (the QDQ activations and int8
layers of `onnxopt.qdq`), so a task carries a few weights, never a model: the
float model, the samples and the float reference outputs are shared once
(`Executor.share`), and each worker rebuilds the trial model from them. The
trials are independent, so their results do not depend on where they run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from onnxopt.data import Sample
from onnxopt.executor import Executor, LocalExecutor, Shared
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.qdq import ActParams, LayerQuant, apply_qdq
from onnxopt.runtime import make_session
from onnxopt.weights import has_external

#: SQNR above this is "identical" (keeps means finite when a trial changes nothing).
SQNR_CAP_DB = 200.0


@dataclass
class Trial:
    """One candidate change: Q/DQ on the tensors in `acts`, int8 weights for `layers`, and int8
    storage (float compute) for the layers in `stored`."""

    name: str
    acts: dict[str, ActParams] = field(default_factory=dict)
    layers: list[LayerQuant] = field(default_factory=list)
    stored: list[LayerQuant] = field(default_factory=list)


@dataclass
class _Task:
    base: Shared
    trial: Trial
    threads: int


def output_sqnr(model: onnx.ModelProto, samples: Sequence[Sample], reference: Sequence[list[np.ndarray]],
                threads: int = 2) -> float:
    """Mean over samples of the worst output's SQNR (dB, capped) of `model` against `reference` outputs."""
    sess = _accuracy_session(model, threads)
    vals = [min(sqnr_db(r, o) for r, o in zip(ref, sess.run(None, feeds))) for feeds, ref in zip(samples, reference)]
    return float(np.mean(np.minimum(vals, SQNR_CAP_DB)))


def reference_outputs(model: onnx.ModelProto, samples: Sequence[Sample], threads: int = 2) -> list[list[np.ndarray]]:
    """The float model's outputs on each sample."""
    sess = _accuracy_session(model, threads)
    return [sess.run(None, feeds) for feeds in samples]


def _accuracy_session(model: onnx.ModelProto, threads: int):
    """A session to compare outputs with. For a big model (weights staged on disk) graph optimizations
    are off: folding its int8-stored weights back to float at load would hold every layer's float
    weight (and the Cast between) at once, about three times the model; unoptimized, each is computed
    per run and freed. Reference and candidates of one model are both big or both not, so alike."""
    return make_session(model, threads=threads, optimize=not has_external(model))


def _run_trial(task: _Task) -> float:
    model, samples, reference = task.base.get()
    trial = task.trial
    return output_sqnr(apply_qdq(model, trial.acts, trial.layers, trial.stored), samples, reference, task.threads)


def sensitivity(model: onnx.ModelProto, samples: Sequence[Sample], trials: Sequence[Trial],
                executor: Executor | None = None, reference: Sequence[list[np.ndarray]] | None = None,
                threads: int = 2) -> dict[str, float]:
    """Output SQNR (dB) of each trial against the float model, run by `executor`: {trial name: dB}.

    Every trial runs onnxruntime with `threads` threads wherever it runs (results can depend on it)."""
    executor = executor or LocalExecutor(1)
    samples = list(samples)
    if reference is None:
        reference = reference_outputs(model, samples, threads)
    base = executor.share((model, samples, list(reference)))
    tasks = [_Task(base, t, threads) for t in trials]
    values = executor.map(_run_trial, tasks, desc="sensitivity", unit="layer")
    return {t.name: v for t, v in zip(trials, values)}
