"""Per-layer sensitivity trials through an executor: quantize one layer, measure the model's output SQNR.

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
from onnxopt.graph import constant_value, import_model, is_constant
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.kernels.quant import quantize_weight_per_channel, quantize_weight_per_tensor, scale_zero_point
from onnxopt.kernels.ranges import range_minmax
from onnxopt.qdq import MAC_OPS, ActParams, LayerQuant, apply_qdq, weight_axis
from onnxopt.runtime import make_session

#: SQNR above this is "identical" (keeps means finite when a trial changes nothing).
SQNR_CAP_DB = 200.0


@dataclass
class Trial:
    """One candidate change: Q/DQ on the tensors in `acts` and int8 weights for `layers`."""

    name: str
    acts: dict[str, ActParams] = field(default_factory=dict)
    layers: list[LayerQuant] = field(default_factory=list)


@dataclass
class _Task:
    base: Shared
    trial: Trial
    threads: int


def output_sqnr(model: onnx.ModelProto, samples: Sequence[Sample], reference: Sequence[list[np.ndarray]],
                threads: int = 2) -> float:
    """Mean over samples of the worst output's SQNR (dB, capped) of `model` against `reference` outputs."""
    sess = make_session(model, threads=threads)
    vals = [min(sqnr_db(r, o) for r, o in zip(ref, sess.run(None, feeds))) for feeds, ref in zip(samples, reference)]
    return float(np.mean(np.minimum(vals, SQNR_CAP_DB)))


def reference_outputs(model: onnx.ModelProto, samples: Sequence[Sample], threads: int = 2) -> list[list[np.ndarray]]:
    """The float model's outputs on each sample."""
    sess = make_session(model, threads=threads)
    return [sess.run(None, feeds) for feeds in samples]


def _run_trial(task: _Task) -> float:
    model, samples, reference = task.base.get()
    return output_sqnr(apply_qdq(model, task.trial.acts, task.trial.layers), samples, reference, task.threads)


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


def minmax_act_params(observers: dict, dtype: str = "uint8") -> dict[str, ActParams]:
    """Asymmetric activation scale/zero point from each observer's exact min/max (a simple, exact baseline)."""
    return {t: ActParams(*scale_zero_point(*range_minmax(o), dtype)) for t, o in observers.items()}


def weight_trials(model: onnx.ModelProto, acts: dict[str, ActParams] | None = None,
                  per_channel: bool | None = None) -> list[Trial]:
    """One trial per MAC layer with a constant weight: its weight in int8 (symmetric; per output channel
    when the opset allows it) and, where `acts` has it, its input activation through Q/DQ. Biases stay float.
    Unnamed nodes are skipped (a trial names its layer)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if per_channel is None:
        per_channel = opset >= 13
    by_name = {n.name: n for n in model.graph.node}
    trials = []
    for node in import_model(model).nodes:
        if node.op not in MAC_OPS or not node.name or len(node.inputs) < 2 or not is_constant(node.inputs[1]):
            continue
        w = np.asarray(constant_value(node.inputs[1]))
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        axis = weight_axis(by_name[node.name]) if per_channel else None
        if axis is None:
            q, s, z = quantize_weight_per_tensor(w)
        else:
            q, s, z = quantize_weight_per_channel(w, axis)
        layer = LayerQuant(node.name, q, np.asarray(s, np.float32), np.asarray(z, np.int8), axis)
        x = node.inputs[0].name
        trial_acts = {x: acts[x]} if acts and x in acts else {}
        trials.append(Trial(node.name, trial_acts, [layer]))
    return trials


def keep_float(sqnr: dict[str, float], target_db: float) -> list[str]:
    """The layer decisions of a sensitivity analysis: layers whose trial falls below `target_db`, worst first."""
    return sorted((k for k, v in sqnr.items() if v < target_db), key=lambda k: (sqnr[k], k))
