"""Per-output comparison of two runs: metrics per sample, their worst case over samples, and the judgement.

Shared by `validate` (local and sharded runs) and `optimize --check`, so one
output is measured and judged the same way everywhere. Per-sample rows are
reduced to one `OutputCheck` per output by `merge_sample_metrics`; the result
is the same whether the rows came from one run over all samples or from
shards run anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxopt.kernels.metrics import (
    class_axis,
    cosine,
    distribution_rows,
    finite_pair,
    max_abs_error,
    mean_abs_error,
    nonfinite_mismatch,
    sqnr_db,
    topk_agreement,
)
from onnxopt.verify.tolerance import Thresholds


@dataclass
class OutputCheck:
    """Worst-case metrics of one output over all samples, and the limits it broke."""

    check: str  # "pass", "backend" or "e2e"
    output: str
    max_abs: float = 0.0
    mean_abs: float = 0.0
    cosine: float | None = None
    sqnr_db: float | None = None
    topk: float | None = None
    nonfinite: int = 0  # entries whose NaN/Inf pattern differs from the reference's
    violations: list[str] = field(default_factory=list)


@dataclass
class SampleMetrics:
    """The metrics of one output on one sample, before the worst case over samples is taken.

    `problem` (a missing output, a wrong shape or dtype, differing values of a
    non-numeric output) stops the comparison of that output at this sample.
    The error metrics are computed over the entries finite in both runs;
    `nonfinite` counts the entries whose NaN/Inf pattern differs.
    """

    problem: str = ""
    max_abs: float = 0.0
    mean_abs: float = 0.0
    cosine: float = 0.0
    sqnr_db: float = 0.0
    nonfinite: int = 0
    scale: float = 0.0
    topk: float | None = None


def class_score_outputs(ref_s: dict[str, np.ndarray], named: list[str] | None = None) -> set[str]:
    """The outputs of one reference sample whose top-k agreement is judged.

    With `named` (`--topk-outputs`), exactly those. Otherwise, conservatively,
    float outputs whose rows along the class axis (the last axis longer than
    1) are probability distributions or log-probabilities in the reference:
    what softmax/log-softmax classifier heads write. Raw logits, boxes,
    embeddings and maps are left to the other metrics; name them to judge them.
    """
    if named is not None:
        return {n for n in named if n in ref_s}
    out = set()
    for name, value in ref_s.items():
        arr = np.asarray(value)
        axis = class_axis(arr.shape) if arr.dtype.kind == "f" else None
        if axis is not None and distribution_rows(arr, axis):
            out.add(name)
    return out


def output_metrics(name: str, ref: np.ndarray, cand: np.ndarray | None, topk: int, scores: set[str]) -> SampleMetrics:
    """How one output `cand` differs from `ref` on one sample; top-`topk` agreement if `name` is in `scores`."""
    if cand is None or cand.shape != ref.shape:
        got = "missing" if cand is None else f"shape {list(cand.shape)}"
        return SampleMetrics(problem=f"{got}, expected shape {list(ref.shape)}")
    cand = np.asarray(cand)
    if cand.dtype != ref.dtype:
        return SampleMetrics(problem=f"dtype {cand.dtype}, expected {ref.dtype}")
    if ref.dtype.kind not in "fiub":  # strings and objects: equal or not
        differ = int(np.count_nonzero(ref != cand))
        if differ:
            return SampleMetrics(problem=f"{differ} of {ref.size} values differ")
        return SampleMetrics(cosine=1.0, sqnr_db=math.inf)
    r, c = finite_pair(ref, cand)
    axis = class_axis(ref.shape)
    return SampleMetrics(
        max_abs=max_abs_error(r, c),
        mean_abs=mean_abs_error(r, c),
        cosine=cosine(r, c),
        sqnr_db=sqnr_db(r, c),
        nonfinite=nonfinite_mismatch(ref, cand),
        # integers are exact or wrong: no bound relative to their magnitude (an index off by one
        # is a different answer however large the index)
        scale=float(np.abs(r).max()) if r.size and ref.dtype.kind == "f" else 0.0,
        topk=float(topk_agreement(ref, cand, topk, axis=axis)) if name in scores and axis is not None else None,
    )


def sample_metrics(
    ref_s: dict[str, np.ndarray], cand_s: dict[str, np.ndarray], topk: int, scores: set[str] | None = None
) -> dict[str, SampleMetrics]:
    """Per output, how CAND's outputs on one sample differ from REF's.

    Top-`topk` agreement along the class axis only for the outputs in `scores`
    (see `class_score_outputs`; None: decided from `ref_s` itself).
    """
    scores = class_score_outputs(ref_s) if scores is None else scores
    return {
        name: output_metrics(name, np.asarray(value), cand_s.get(name), topk, scores) for name, value in ref_s.items()
    }


def _merge_output(check: str, name: str, per_sample: list[dict[str, SampleMetrics]], limits: Thresholds) -> OutputCheck:
    """The worst case of output `name` over the samples that have it, judged against `limits`."""
    oc = OutputCheck(check, name)
    cosines, sqnrs, topks, means, scale = [], [], [], [], 0.0
    for rows in per_sample:
        m = rows.get(name)
        if m is None:
            continue
        if m.problem:
            oc.violations.append(m.problem)
            break
        oc.max_abs = max(oc.max_abs, m.max_abs)
        means.append(m.mean_abs)
        cosines.append(m.cosine)
        sqnrs.append(m.sqnr_db)
        oc.nonfinite += m.nonfinite
        scale = max(scale, m.scale)
        if m.topk is not None:
            topks.append(m.topk)
    oc.mean_abs = float(np.mean(means)) if means else 0.0
    oc.cosine = min(cosines) if cosines else None
    oc.sqnr_db = min(sqnrs) if sqnrs else None
    oc.topk = min(topks) if topks else None
    if not oc.violations:
        oc.violations = judge(oc, limits, scale)
    return oc


def merge_sample_metrics(
    check: str, per_sample: list[dict[str, SampleMetrics]], limits: Thresholds
) -> list[OutputCheck]:
    """The worst case of each output over the samples, in sample order, judged against `limits`.

    Max of max_abs, scale and the new-NaN/Inf count summed; mean of the
    per-sample mean_abs; min of cosine, SQNR and top-k. Given the same
    per-sample rows in the same order, the result is the same whether they came
    from one run over all samples or from shards run anywhere. Outputs are
    listed in order of first appearance; a sample without an output (a
    sequence shorter there, in `--check`) does not count for it.
    """
    names = list(dict.fromkeys(name for rows in per_sample for name in rows))
    return [_merge_output(check, name, per_sample, limits) for name in names]


def compare_outputs(
    check: str,
    refs: list[dict[str, np.ndarray]],
    cands: list[dict[str, np.ndarray]],
    limits: Thresholds,
    scores: Sequence[set[str] | None] | None = None,
) -> list[OutputCheck]:
    """Compare two runs output by output over all samples, keep the worst metrics and judge them.

    `scores[i]`: the class-score outputs of sample i (from the original's outputs,
    so every check of a sample judges top-k on the same outputs).
    """
    scores = scores or [None] * len(refs)
    return merge_sample_metrics(
        check, [sample_metrics(r, c, limits.topk, s) for r, c, s in zip(refs, cands, scores)], limits
    )


def judge(oc: OutputCheck, t: Thresholds, ref_scale: float) -> list[str]:
    """The limits of `t` that the metrics of `oc` break, as readable phrases."""
    out = [f"{oc.nonfinite} NaN/Inf entries where the original has other values"] if oc.nonfinite else []
    bound = t.atol + t.rtol * ref_scale
    if oc.max_abs <= bound:
        return out
    if t.require_close:
        out.append(f"max_abs {oc.max_abs:.3g} > {bound:.3g}")
    if t.min_cosine is not None and oc.cosine is not None and oc.cosine < t.min_cosine:
        out.append(f"cosine {oc.cosine:.6f} < {t.min_cosine:g}")
    if t.min_sqnr_db is not None and oc.sqnr_db is not None and oc.sqnr_db < t.min_sqnr_db:
        out.append(f"sqnr {oc.sqnr_db:.1f} dB < {t.min_sqnr_db:g} dB")
    if t.min_topk is not None and oc.topk is not None and oc.topk < t.min_topk:
        out.append(f"top{t.topk} agreement {oc.topk:.3f} < {t.min_topk:g}")
    return out
