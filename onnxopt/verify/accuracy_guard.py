"""The end-to-end accuracy guard of the approximate passes (prune, lowrank).

Those passes choose their changes from per-layer estimates (spectra, channel
scores) that say nothing about how errors compound through the rest of the
model, so a budget can be spent while the outputs drift far outside the
"approximate" tolerance (`onnxopt.verify.tolerance.Tolerance`). The guard closes that
gap on the data the pass already has: it runs the float model once on a few
calibration samples held out from the fit, and scores every candidate model
by the worst output cosine over those samples and outputs. `search` then
bisects over an ordered list of changes (least harmful first) for the longest
prefix whose model still meets the target, so a pass backs off only as far as
it must, and reports what it measured.

Held-out samples matter: statistics fit on few rows reproduce those rows
almost exactly (a whitened factorization of a 512-wide layer seen on 32 rows is
exact on them and not on the next file), so an in-sample guard would pass
anything. Once the changes are chosen, the pass refits its numbers (factors,
compensation) on all samples, held-out ones included, for the same changes:
the guard's measure is then that of a model fit on less data.

`run_guard` is what a pass calls: it searches, writes the report fields and the verdict
(`stats["guard"]`, worded with the pass's `GuardWording`); `trial_graph` gives each trial a
fresh graph to rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.data.samples import Sample, model_inputs
from onnxopt.framework.options import option
from onnxopt.ir.graph import import_model
from onnxopt.ir.weights import has_external
from onnxopt.kernels.metrics import cosine
from onnxopt.runtime.sessions import make_session
from onnxopt.verify.outputs import reference_outputs


@dataclass
class GuardOptions:
    """Options of the guard, shared by the passes that use it (their `Options` derive from this)."""

    min_cosine: float = option(
        0.99,
        "accuracy guard (with calibration data): the worst output cosine vs float "
        "on the guard samples must reach this, else the pass backs off; 0 = no guard",
        low=0,
        high=1,
    )
    holdout: float = option(
        0.25,
        "share of the calibration samples kept out of the fit for the guard (a single "
        "batched sample is split by rows; with nothing to spare the guard measures "
        "in-sample)",
        low=0,
        below=1,
    )
    guard_samples: int = option(8, "at most this many samples are run by the guard", low=1)


@dataclass
class Split:
    """Calibration samples split for a guarded pass."""

    #: Samples the pass fits its choice on.
    fit: Any
    #: Samples kept out of the fit (empty when nothing could be spared); merged in for the final refit.
    held: Any
    #: The samples the guard runs (at most `limit` of `held`, or of `fit` when nothing is held out).
    guard: list[Sample]

    @property
    def held_out(self) -> bool:
        return bool(self.guard) and self.held is not None and len(self.held) > 0


def split_samples(calibration: Any, holdout: float, limit: int, model: onnx.ModelProto | None = None) -> Split:
    """Keep the last ``holdout`` share of the samples (at least one, never all) out of the fit.

    A single sample that is a batch (every input's first dimension the same B > 1, and dynamic
    in `model`) is split by rows instead: one file of 32 sentences is the common case. Otherwise,
    or with ``holdout`` 0, nothing is held out and the guard measures on (up to ``limit`` of) the
    fitting samples, which it says in its report. `calibration` is a `CalibrationData` (split
    with `subset`, so a directory reads only its files) or any sized iterable of samples.
    """
    n = len(calibration)
    if n == 1 and holdout > 0 and model is not None:
        rows = _split_batch(next(iter(calibration)), holdout, model)
        if rows is not None:
            return Split([rows[0]], [rows[1]], [rows[1]])
    cut = min(n - max(1, int(round(n * holdout))), n - 1) if holdout > 0 and n >= 2 else n
    if cut == n:
        return Split(calibration, [], [s for _, s in zip(range(limit), calibration)])
    if hasattr(calibration, "subset"):
        fit, held = calibration.subset(0, cut), calibration.subset(cut, n)
    else:
        items = list(calibration)
        fit, held = items[:cut], items[cut:]
    return Split(fit, held, [s for _, s in zip(range(limit), held)])


def _split_batch(sample: Sample, holdout: float, model: onnx.ModelProto) -> tuple[Sample, Sample] | None:
    """(first rows, last ``holdout`` share of the rows) of a batched sample, None if it is not one."""
    declared = model_inputs(model)
    sizes = {np.asarray(v).shape[0] if np.ndim(v) else 0 for v in sample.values()}
    if len(sizes) != 1 or (batch := sizes.pop()) < 2:
        return None
    if any(
        not dims or (isinstance(dims[0], int) and dims[0] > 0)
        for _, dims in (declared.get(k, (None, ())) for k in sample)
    ):
        return None
    cut = batch - min(max(1, int(round(batch * holdout))), batch - 1)
    return {k: np.asarray(v)[:cut] for k, v in sample.items()}, {k: np.asarray(v)[cut:] for k, v in sample.items()}


def output_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of two float outputs; for integer/bool outputs (labels, indices) the share of equal elements."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        return 0.0
    if ref.dtype.kind in "fc":
        value = cosine(ref, cand)
        return value if np.isfinite(value) or not np.isfinite(ref).all() else 0.0
    return float(np.mean(ref == cand)) if ref.size else 1.0


@dataclass
class Trial:
    """One measured candidate: the first `kept` changes applied, its worst output cosine."""

    kept: int
    cosine: float


@dataclass
class Outcome:
    """What `AccuracyGuard.search` found: the longest prefix meeting the target (0: none) and every trial."""

    kept: int
    cosine: float
    trials: list[Trial] = field(default_factory=list)

    def stats(self, total: int, min_cosine: float, held_out: bool, samples: int) -> dict[str, Any]:
        """The report fields every guarded pass writes."""
        return {
            "guard_min_cosine": min_cosine,
            "guard_cosine": round(self.cosine, 6),
            "guard_samples": samples,
            "guard_held_out": held_out,
            "guard_kept_changes": self.kept,
            "guard_candidate_changes": total,
            "guard_trials": [[t.kept, round(t.cosine, 6)] for t in self.trials],
        }


class AccuracyGuard:
    """Float reference outputs on a few samples, and the worst output cosine of candidates against them."""

    def __init__(self, model: onnx.ModelProto, samples: Sequence[Sample], min_cosine: float, threads: int = 2):
        self.samples = list(samples)
        self.min_cosine = float(min_cosine)
        self.threads = threads
        self.reference = reference_outputs(model, self.samples, threads) if self.samples else []

    def measure(self, candidate: onnx.ModelProto) -> float:
        """Worst cosine over samples and outputs of `candidate` against the float model (1.0 with no samples)."""
        if not self.samples:
            return 1.0
        sess = make_session(candidate, threads=self.threads, optimize=not has_external(candidate))
        worst = 1.0
        for feeds, ref in zip(self.samples, self.reference):
            for r, c in zip(ref, sess.run(None, feeds)):
                worst = min(worst, output_agreement(r, c))
        return worst

    def search(self, total: int, build: Callable[[int], onnx.ModelProto]) -> Outcome:
        """Longest prefix k (0..total) of the ordered changes whose model meets `min_cosine`.

        `build(k)` returns the model with the first k changes applied (k = 0 is the original,
        which meets any target by definition). All changes are tried first; if they miss, k is
        bisected between the last prefix that met the target and the first that missed, which
        assumes (as ordering the least harmful changes first makes likely) that the error grows
        with k; the answer is always a prefix that was measured to meet the target, or 0.
        """
        trials: list[Trial] = []

        def score(k: int) -> float:
            value = self.measure(build(k))
            trials.append(Trial(k, value))
            return value

        if total <= 0:
            return Outcome(0, 1.0, trials)
        full = score(total)
        if full >= self.min_cosine:
            return Outcome(total, full, trials)
        good, good_cos, bad = 0, 1.0, total
        while bad - good > 1:
            mid = (good + bad) // 2
            value = score(mid)
            if value >= self.min_cosine:
                good, good_cos = mid, value
            else:
                bad = mid
        return Outcome(good, good_cos, trials)


#: The verdict when the guard did not run because it was turned off or had no data.
GUARD_OFF = "off (min_cosine=0)"
GUARD_NO_DATA = "not measured: no calibration data (give --calib to bound the output error)"


def guard_not_run(min_cosine: float) -> str:
    """The verdict of a pass that changed the model without running the guard (off, or no data)."""
    return GUARD_OFF if min_cosine <= 0 else GUARD_NO_DATA


@dataclass(frozen=True)
class GuardWording:
    """How a pass names its ordered changes in the guard's verdict.

    `kept` follows "<k> of <n>" when the guard backs off; `full` names the all-changes trial;
    `failed` says how little was tried when nothing met the target, formatted with `least`
    (the changes of that trial) and `total`.
    """

    kept: str
    full: str
    failed: str


def run_guard(
    model: onnx.ModelProto,
    samples: Sequence[Sample],
    min_cosine: float,
    held_out: bool,
    total: int,
    build: Callable[[int], onnx.ModelProto],
    stats: dict[str, Any],
    wording: GuardWording,
) -> Outcome:
    """Search the longest prefix of `total` ordered changes meeting `min_cosine` (see `AccuracyGuard.search`),
    and write the guard's report fields and verdict (`stats["guard"]`) into `stats`."""
    out = AccuracyGuard(model, samples, min_cosine).search(total, build)
    stats.update(out.stats(total, min_cosine, held_out, len(samples)))
    where = f"{len(samples)} {'held-out' if held_out else 'calibration (not held-out)'} samples"
    if out.kept == total:
        stats["guard"] = f"met: output cosine {out.cosine:.4f} >= {min_cosine} on {where}"
    elif out.kept:
        stats["guard"] = (
            f"backed off: {out.kept} of {total} {wording.kept}, output cosine "
            f"{out.cosine:.4f} >= {min_cosine} on {where} ({wording.full}: {out.trials[0].cosine:.4f})"
        )
    else:
        least = min(out.trials, key=lambda t: t.kept)
        stats["guard"] = (
            f"the accuracy guard measured output cosine {least.cosine:.4f} < min_cosine={min_cosine} on {where} "
            f"{wording.failed.format(least=least.kept, total=total)}; the model is left unchanged"
        )
    return out


def trial_graph(model: onnx.ModelProto) -> gs.Graph:
    """A fresh graph of `model` for one guard trial to rewrite (its taken names are collected on first use,
    as in a pass the manager runs)."""
    return import_model(model)


def nodes_by_output(graph: gs.Graph) -> dict[str, gs.Node]:
    """The nodes of `graph` by the name of their first output: how a trial finds the nodes a pass chose
    on the original graph."""
    return {n.outputs[0].name: n for n in graph.nodes if n.outputs}
