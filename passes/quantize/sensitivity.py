"""Per-layer sensitivity trials through an executor: quantize one layer, measure the model's output SQNR.

The quantize pass decides what a trial is (its weights, biases and Q/DQ
placement) and what to do with the results (its serial search for the layers
to keep float, `search`); this module only runs the trials and scores
them, so a trial scores the same in the pass, in the tests and in the bench.

A trial is what differs from the float model (the QDQ activations and int8
layers of `qdq`), so a task carries a few weights, never a model: the
float model, the samples and the float reference outputs are shared once
(`Executor.share`), and each worker rebuilds the trial model from them. The
trials are independent, so their results do not depend on where they run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxopt.data.samples import Sample
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant, apply_qdq
from onnxopt.runtime.executor import Executor, LocalExecutor, Shared
from onnxopt.verify.outputs import output_sqnr, reference_outputs


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
    """What a worker gets for one trial: the shared float model, samples and reference, the trial."""

    base: Shared
    trial: Trial
    threads: int


def _run_trial(task: _Task) -> float:
    """The output SQNR of one trial, in whichever process the executor runs it."""
    model, samples, reference = task.base.get()
    trial = task.trial
    return output_sqnr(apply_qdq(model, trial.acts, trial.layers, trial.stored), samples, reference, task.threads)


def sensitivity(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    trials: Sequence[Trial],
    executor: Executor | None = None,
    reference: Sequence[list[np.ndarray]] | None = None,
    threads: int = 2,
) -> dict[str, float]:
    """Output SQNR (dB) of each trial against the float model, run by `executor`: {trial name: dB}.

    Every trial runs onnxruntime with `threads` threads wherever it runs (results can depend on it)."""
    if not trials:  # nothing to run: do not ship the model to the executor's workers
        return {}
    executor = executor or LocalExecutor(1)
    samples = list(samples)
    if reference is None:
        reference = reference_outputs(model, samples, threads)
    base = executor.share((model, samples, list(reference)))
    tasks = [_Task(base, t, threads) for t in trials]
    values = executor.map(_run_trial, tasks, desc="sensitivity", unit="layer")
    return {t.name: v for t, v in zip(trials, values)}
