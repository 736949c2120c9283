"""`onnxopt validate REF CAND`: compare an optimized model with its original on execution providers.

Three kinds of run, each in a worker process (`onnxopt.ep`):

- REF on the CPU EP: the reference outputs (and REF's CPU latency);
- CAND on the CPU EP with graph optimizations off: `pass` check, the error the
  optimizer's passes made;
- CAND on each target EP: `backend` check (against CAND on the CPU EP without
  optimizations, i.e. the backend's own error) and `e2e` check (against REF,
  what a deployment sees), plus node placement and CAND/REF latency.

Thresholds follow the tolerance class of what the passes were allowed to change
(`exact`, `approximate`, `quantize`, as in `onnxopt.check`), taken from, in
order: `--tolerance` (`tolerance=` in Python), the candidate's own record
(`onnxopt.tolerance` in its `metadata_props`, written by `optimize`), the
pipeline's class when `optimize --validate` runs it, else `exact`. The report
says which one was used and where it came from.

Top-k agreement is judged only for outputs that hold class scores: the ones
named with `--topk-outputs`, else those whose reference rows along the class
axis (the last axis longer than 1) are probability distributions or their
logs, as softmax/log-softmax write them. A detector's box tensor or a
hidden state is judged by the other metrics only.

Each EP ends `passed`, `failed`, `skipped` (it could not run here) or
`inconclusive` (the candidate fails there but the original fails there too, so
the candidate is not blamed). The verdict is one word derived from those and
the pass check, so the EP blocks and the verdict never disagree: `FAILED`
when the candidate's own error (pass check) or any EP failed; else
`INCONCLUSIVE` when the original fails (on the CPU EP: nothing to compare
with; on an EP: that EP is inconclusive), when an EP asked for could not run
(unless `allow_missing_ep`, and never when no EP ran at all); else `PASSED`.
Exit code of `onnxopt validate`: 0 only for PASSED, 1 for FAILED and for
INCONCLUSIVE (the JSON report's `verdict` tells them apart), 2 for bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import external_data_helper

from onnxopt.data import CalibrationData, Sample, model_inputs, seeded_inputs
from onnxopt.ep import EP_PROVIDERS, provider_name
from onnxopt.ep.envs import EpInterpreter, resolve_interpreter
from onnxopt.ep.runner import WorkerJob, WorkerResult, run_worker, write_inputs
from onnxopt.errors import UserError
from onnxopt.executor import Executor, LocalExecutor, Shared, add_executor_arguments, executor_from_args
from onnxopt.kernels.metrics import (class_axis, cosine, distribution_rows, finite_pair, max_abs_error,
                                     mean_abs_error, nonfinite_mismatch, sqnr_db, topk_agreement)
from onnxopt.model_io import load_model, save_model
from onnxopt.progress import progress
from onnxopt.provenance import TOLERANCE_KEY, recorded_provenance
from onnxopt.shapes import parse_input_shapes
from onnxopt.sharded_calibration import shard_bounds

CPU = EP_PROVIDERS["cpu"]
IGNORED_FALLBACK_OPS = {"MemcpyToHost", "MemcpyFromHost"}
"""Nodes onnxruntime inserts itself to move data; on the CPU EP by design, not a fallback."""


@dataclass
class Thresholds:
    """Limits on one comparison; None disables a limit.

    An output within `atol + rtol * max|ref|` of the reference is equal to float
    rounding and passes outright: cosine and SQNR of a near-zero output (a
    detector's map on an empty image) measure only noise. `require_close` makes
    that closeness itself a limit (exact passes).
    """

    atol: float = 1e-5
    rtol: float = 1e-4
    require_close: bool = False
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_topk: float | None = None
    topk: int = 1

    def looser(self, other: Thresholds) -> Thresholds:
        """The limits that both `self` and `other` would accept (each field the looser one).

        A limit that only one side sets is kept: the backend limits leave top-k
        unjudged, and the end-to-end check must not drop the passes' top-k limit.
        """
        def lo(a, b):
            return b if a is None else a if b is None else min(a, b)
        return Thresholds(max(self.atol, other.atol), max(self.rtol, other.rtol),
                          self.require_close and other.require_close, lo(self.min_cosine, other.min_cosine),
                          lo(self.min_sqnr_db, other.min_sqnr_db), lo(self.min_topk, other.min_topk), self.topk)

    def describe(self) -> str:
        parts = [f"max_abs{'<=' if self.require_close else ' ok if <='}{self.atol:g}+{self.rtol:g}*max|ref|"]
        if self.min_cosine is not None:
            parts.append(f"cosine>={self.min_cosine:g}")
        if self.min_sqnr_db is not None:
            parts.append(f"sqnr>={self.min_sqnr_db:g}dB")
        if self.min_topk is not None:
            parts.append(f"top{self.topk}>={self.min_topk:g}")
        return " ".join(parts)


PASS_THRESHOLDS: dict[str, Thresholds] = {
    "exact": Thresholds(require_close=True, min_cosine=0.99999, min_sqnr_db=60.0),
    "approximate": Thresholds(min_cosine=0.98, min_sqnr_db=15.0, min_topk=0.9),
    "quantize": Thresholds(min_cosine=0.99, min_sqnr_db=20.0, min_topk=0.9),
}
"""What a pipeline of each tolerance class may change (CAND vs REF, both on the CPU EP)."""

BACKEND_THRESHOLDS: dict[str, Thresholds] = {
    "exact": Thresholds(min_cosine=0.9999, min_sqnr_db=40.0),
    "approximate": Thresholds(min_cosine=0.9999, min_sqnr_db=40.0),
    "quantize": Thresholds(min_cosine=0.995, min_sqnr_db=25.0),
}
"""How far a backend may differ from the CPU EP on the same model (float kernels vs integer kernels)."""


@dataclass
class ThresholdSet:
    """The limits of one validation: `pass` for the passes' error, `backend` for an EP's own error."""

    tolerance: str = "exact"
    pass_: Thresholds = field(default_factory=lambda: PASS_THRESHOLDS["exact"])
    backend: Thresholds = field(default_factory=lambda: BACKEND_THRESHOLDS["exact"])

    @classmethod
    def for_tolerance(cls, tolerance: str, **overrides) -> ThresholdSet:
        """Defaults of a tolerance class, with pass-limit overrides (`min_cosine=0.999`, ...)."""
        if tolerance not in PASS_THRESHOLDS:
            raise UserError(f"unknown tolerance {tolerance!r}; use one of: {', '.join(PASS_THRESHOLDS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "atol" in given:  # an explicit max abs error is a hard limit
            given.update(rtol=0.0, require_close=True)
        return cls(tolerance, dataclasses.replace(PASS_THRESHOLDS[tolerance], **given),
                   dataclasses.replace(BACKEND_THRESHOLDS[tolerance], topk=given.get("topk", 1)))


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
class Placement:
    """Where onnxruntime put the nodes of CAND on one EP, read from the session."""

    method: str
    provider: str
    total: int
    on_target: int | None
    subgraphs: int
    fallback: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        short = self.provider.removesuffix("ExecutionProvider")
        count = f"{self.on_target} of {self.total} nodes" if self.on_target is not None else "nodes"
        text = f"{short}: {count}"
        if self.provider != CPU:
            text += f" in {self.subgraphs} subgraph{'s' if self.subgraphs != 1 else ''}"
        if self.provider != CPU and self.fallback:
            names = ", ".join(f"{n['name'] or '(unnamed)'} ({n['op_type']})" for n in self.fallback[:10])
            more = f" and {len(self.fallback) - 10} more" if len(self.fallback) > 10 else ""
            text += f"; fell back to CPU: {names}{more}"
        return text + f" [{self.method}]"


@dataclass
class Latency:
    """Median latency of REF and CAND on one EP after warm-up, with fixed threads."""

    ref_ms: float | None
    cand_ms: float | None
    runs: int
    threads: int

    @property
    def ratio(self) -> float | None:
        return self.cand_ms / self.ref_ms if self.ref_ms and self.cand_ms else None


@dataclass
class EpReport:
    """Everything validation found on one EP.

    status: `passed`, `failed`, `skipped` (could not run here; `reason` says
    why) or `inconclusive` (the candidate fails here, and so does the
    original; `reason` says how). `ref_checks` (REF on this EP against REF on
    the CPU EP) are computed when the candidate fails here, to tell the two apart.
    """

    ep: str
    status: str = "passed"
    reason: str = ""
    interpreter: str = ""
    ort_version: str = ""
    checks: list[OutputCheck] = field(default_factory=list)
    ref_checks: list[OutputCheck] = field(default_factory=list)
    placement: Placement | None = None
    latency: Latency | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    """The result of `validate`: the passes' own error, one `EpReport` per EP, and the verdict."""

    ref: str
    cand: str
    inputs: str
    samples: int
    thresholds: ThresholdSet
    tolerance_source: str = "default"
    pass_checks: list[OutputCheck] = field(default_factory=list)
    pass_errors: list[str] = field(default_factory=list)
    ref_errors: list[str] = field(default_factory=list)
    eps: list[EpReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_missing_ep: bool = False

    @property
    def candidate_failed_pass(self) -> bool:
        """The passes' own error (CAND vs REF on the CPU EP) broke a limit, or CAND did not run there."""
        return bool(self.pass_errors) or any(c.violations for c in self.pass_checks)

    @property
    def verdict(self) -> str:
        """`passed`, `failed` or `inconclusive`; see the module docstring for the rule."""
        if self.ref_errors:
            return "inconclusive"
        if self.candidate_failed_pass or any(e.status == "failed" for e in self.eps):
            return "failed"
        judged = [e for e in self.eps if e.status == "passed"]
        if not judged or any(e.status == "inconclusive" for e in self.eps):
            return "inconclusive"
        if any(e.status == "skipped" for e in self.eps) and not self.allow_missing_ep:
            return "inconclusive"
        return "passed"

    @property
    def passed(self) -> bool:
        """True only for the verdict `passed`: an EP that did not run, or was not judged, is not a pass."""
        return self.verdict == "passed"

    def verdict_line(self) -> str:
        """`result: VERDICT` and, when it is not a plain pass, what made it so."""
        v = self.verdict
        skipped = [e.ep for e in self.eps if e.status == "skipped"]
        why = []
        if self.ref_errors:
            why.append("the original model fails on the CPU EP; nothing to compare the candidate with")
        if v == "failed" and self.candidate_failed_pass:
            why.append("the candidate's own error (CAND vs REF on the CPU EP) breaks the limits")
        why += [f"{e.ep}: the candidate fails here" for e in self.eps if e.status == "failed"]
        if not self.ref_errors:
            why += [f"{e.ep}: the original fails here too" for e in self.eps if e.status == "inconclusive"]
        if skipped and (v != "passed" or self.allow_missing_ep):
            allowed = " (allowed by --allow-missing-ep)" if self.allow_missing_ep and v == "passed" else (
                "; pass --allow-missing-ep to accept that" if not self.allow_missing_ep and not self.ref_errors
                and any(e.status == "passed" for e in self.eps) else "")
            why.append(f"not run here: {', '.join(skipped)}{allowed}")
        if not self.ref_errors and not any(e.status in ("passed", "failed", "inconclusive") for e in self.eps):
            why.append("no EP was judged")
        return f"result: {v.upper()}" + (f" ({'; '.join(why)})" if why else "")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["thresholds"]["pass"] = d["thresholds"].pop("pass_")
        d["passed"] = self.passed
        d["verdict"] = self.verdict
        for e, raw in zip(self.eps, d["eps"]):
            if e.latency:
                raw["latency"]["ratio"] = e.latency.ratio
        return _json_safe(d)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON through a temporary file, so a reader never sees half of it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    def format_table(self) -> str:
        """The human-readable report: per check and output a row of metrics, per EP placement and latency."""
        t = self.thresholds
        lines = [f"validate {self.ref} -> {self.cand}",
                 f"inputs: {self.inputs}",
                 f"tolerance {t.tolerance} (from {self.tolerance_source}): pass {t.pass_.describe()}; "
                 f"backend {t.backend.describe()}"]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += ["", "passes (CAND vs REF, CPU EP, graph optimizations off)"]
        lines += _table(self.pass_checks) + [f"  error: {e}" for e in self.pass_errors]
        lines += [f"  the original fails here: {e}" for e in self.ref_errors]
        for e in self.eps:
            head = f"{e.ep} [{e.status.upper()}]"
            if e.ort_version:
                head += f" onnxruntime {e.ort_version} ({e.interpreter})"
            lines += ["", head]
            if e.reason:
                lines.append(f"  reason: {e.reason}")
            lines += _table(e.checks)
            if e.status == "inconclusive" and e.ref_checks:
                lines += ["  the original on this EP (REF here vs REF on the CPU EP):"] + _table(e.ref_checks)
            if e.placement:
                lines.append(f"  placement: {e.placement.summary()}")
            if e.latency:
                lat = e.latency
                ratio = f"{lat.ratio:.2f}" if lat.ratio else "n/a"
                lines.append(f"  latency: REF {_ms(lat.ref_ms)}, CAND {_ms(lat.cand_ms)}, CAND/REF {ratio} "
                             f"(median of {lat.runs} runs, {lat.threads} thread{'s' if lat.threads != 1 else ''})")
            lines += [f"  error: {err}" for err in e.errors]
            lines += [f"  note: {n}" for n in e.notes]
        lines += ["", self.verdict_line()]
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return f"{v:.3f} ms" if v is not None else "n/a"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(checks: list[OutputCheck]) -> list[str]:
    if not checks:
        return []
    rows = [("check", "output", "max_abs", "mean_abs", "cosine", "sqnr_db", "topk", "nan/inf", "result")]
    for c in checks:
        rows.append((c.check, c.output, _fmt(c.max_abs, ".3g"), _fmt(c.mean_abs, ".3g"), _fmt(c.cosine, ".6f"),
                     _fmt(c.sqnr_db, ".1f"), _fmt(c.topk, ".3f"), str(c.nonfinite),
                     "ok" if not c.violations else "FAIL: " + "; ".join(c.violations)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]


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


def sample_metrics(ref_s: dict[str, np.ndarray], cand_s: dict[str, np.ndarray], topk: int,
                   scores: set[str] | None = None) -> dict[str, SampleMetrics]:
    """Per output, how CAND's outputs on one sample differ from REF's.

    Top-`topk` agreement along the class axis only for the outputs in `scores`
    (see `class_score_outputs`; None: decided from `ref_s` itself).
    """
    scores = class_score_outputs(ref_s) if scores is None else scores
    rows = {}
    for name, value in ref_s.items():
        ref, cand = np.asarray(value), cand_s.get(name)
        if cand is None or cand.shape != ref.shape:
            got = "missing" if cand is None else f"shape {list(cand.shape)}"
            rows[name] = SampleMetrics(problem=f"{got}, expected shape {list(ref.shape)}")
            continue
        cand = np.asarray(cand)
        if cand.dtype != ref.dtype:
            rows[name] = SampleMetrics(problem=f"dtype {cand.dtype}, expected {ref.dtype}")
            continue
        if ref.dtype.kind not in "fiub":  # strings and objects: equal or not
            differ = int(np.count_nonzero(ref != cand))
            rows[name] = (SampleMetrics(problem=f"{differ} of {ref.size} values differ") if differ
                          else SampleMetrics(cosine=1.0, sqnr_db=math.inf))
            continue
        r, c = finite_pair(ref, cand)
        axis = class_axis(ref.shape)
        rows[name] = SampleMetrics(
            max_abs=max_abs_error(r, c), mean_abs=mean_abs_error(r, c), cosine=cosine(r, c), sqnr_db=sqnr_db(r, c),
            nonfinite=nonfinite_mismatch(ref, cand), scale=float(np.abs(r).max()) if r.size else 0.0,
            topk=float(topk_agreement(ref, cand, topk, axis=axis)) if name in scores and axis is not None else None)
    return rows


def merge_sample_metrics(check: str, per_sample: list[dict[str, SampleMetrics]],
                         limits: Thresholds) -> list[OutputCheck]:
    """The worst case of each output over the samples, in sample order, judged against `limits`.

    Max of max_abs, scale and the new-NaN/Inf count summed; mean of the
    per-sample mean_abs; min of cosine, SQNR and top-k. Given the same
    per-sample rows in the same order, the result is the same whether they came
    from one run over all samples or from shards run anywhere.
    """
    results = []
    for name in per_sample[0] if per_sample else ():
        oc = OutputCheck(check, name)
        cosines, sqnrs, topks, means, scale = [], [], [], [], 0.0
        for rows in per_sample:
            m = rows[name]
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
        results.append(oc)
    return results


def compare_outputs(check: str, refs: list[dict[str, np.ndarray]], cands: list[dict[str, np.ndarray]],
                    limits: Thresholds, scores: list[set[str]] | None = None) -> list[OutputCheck]:
    """Compare two runs output by output over all samples, keep the worst metrics and judge them.

    `scores[i]`: the class-score outputs of sample i (from the original's outputs,
    so every check of a sample judges top-k on the same outputs).
    """
    scores = scores or [None] * len(refs)
    return merge_sample_metrics(check, [sample_metrics(r, c, limits.topk, s) for r, c, s in zip(refs, cands, scores)],
                                limits)


def _json_safe(value):
    """Replace inf by "inf"/"-inf" and NaN by None so the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


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


def read_placement(res: WorkerResult, provider: str, model: onnx.ModelProto) -> Placement | None:
    """Summarise the worker's per-node placement: nodes on the target EP and those left to the CPU EP."""
    raw = res.placement
    if not raw:
        return None
    nodes = raw.get("nodes", [])
    fallback = [n for n in nodes if n["ep"] != provider and n["op_type"] not in IGNORED_FALLBACK_OPS]
    subgraphs = sum(1 for s in raw.get("subgraphs", []) if s["ep"] == provider)
    if raw.get("method") == "assignment_info":
        total = len([n for n in nodes if n["op_type"] not in IGNORED_FALLBACK_OPS])
        on_target = total - len(fallback)
    else:  # a profile lists compiled subgraphs as one node each: count against the model's node count
        total = len(model.graph.node)
        on_target = None if provider != CPU else len(nodes)
        if provider != CPU and subgraphs:
            on_target = max(total - len(fallback), 0)
    return Placement(raw.get("method", "?"), provider, total, on_target, subgraphs,
                     [] if provider == CPU else fallback)


@dataclass
class _Run:
    """What `validate` needs to start workers: the stored inputs and run settings."""

    inputs_npz: Path
    input_names: list[str]
    samples: int
    threads: int
    warmup: int
    runs: int
    timeout: float

    def job(self, python: str, model: Path, provider: str, level: str = "all", timed: bool = False,
            placement: bool = False, outputs: bool = True, env: dict[str, str] | None = None) -> WorkerResult:
        options = {"num_of_threads": self.threads} if provider == EP_PROVIDERS["openvino"] else {}
        job = WorkerJob(str(model), provider, options, level, self.threads,
                        self.warmup if timed else 0, self.runs if timed else 0, placement, want_outputs=outputs)
        return run_worker(python, job, self.inputs_npz, self.input_names, self.samples, timeout=self.timeout,
                          env=env)


def _failure(res: WorkerResult, what: str) -> str:
    text = f"{what}: {res.error}"
    if res.stderr_tail and res.status == "error":
        text += "\n    stderr: " + res.stderr_tail[-600:].replace("\n", "\n    ")
    return text


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def resolve_tolerance(cand_model: onnx.ModelProto, tolerance: str | None = None,
                      default: str | None = None) -> tuple[str, str, list[str]]:
    """The tolerance class to judge `cand_model` with, where it came from, and warnings.

    Order: `tolerance` (given by the user), the class the candidate records
    (`onnxopt.tolerance`, written by `optimize`), `default` (the pipeline's
    class, from `optimize --validate`), else `exact`.
    """
    recorded, pipeline = recorded_provenance(cand_model)
    made_by = f", pipeline {pipeline!r}" if pipeline else ""
    warnings = []
    if recorded is not None and recorded not in PASS_THRESHOLDS:
        warnings.append(f"the candidate records an unknown {TOLERANCE_KEY}={recorded!r}; ignored")
        recorded = None
    if tolerance is not None:
        if recorded is not None and recorded != tolerance:
            warnings.append(f"the candidate records tolerance {recorded!r}{made_by}; judging with "
                            f"{tolerance!r} as asked")
        return tolerance, "the tolerance argument", warnings
    if recorded is not None:
        return recorded, f"the candidate's metadata: {TOLERANCE_KEY}{made_by}", warnings
    if default is not None:
        return default, "the pipeline that made the candidate", warnings
    return "exact", f"default: the candidate records no {TOLERANCE_KEY}", warnings


def validate(ref: str | os.PathLike | onnx.ModelProto, cand: str | os.PathLike | onnx.ModelProto,
             eps: tuple[str, ...] | list[str] = ("cpu",), data=None, samples: int = 8,
             thresholds: ThresholdSet | None = None, require_no_fallback: bool = False,
             seed: int = 0, input_shapes: dict[str, tuple[int, ...]] | None = None, threads: int = 1,
             warmup: int = 3, runs: int = 10, timeout: float = 600.0,
             ep_python: dict[str, str] | None = None, executor: Executor | None = None,
             tolerance: str | None = None, limits: dict[str, float | int | None] | None = None,
             default_tolerance: str | None = None, topk_outputs: list[str] | None = None,
             allow_missing_ep: bool = False) -> ValidationReport:
    """Validate CAND against REF on the given EPs; see the module docstring for what runs where.

    `data` is a calibration-format path or iterable of samples (else `samples`
    seeded random inputs). `ep_python` names an interpreter per EP. With an
    `executor`, the accuracy runs go to its workers in shards of samples and
    only placement and latency run here (see `_validate_sharded`); without one,
    everything runs from this process.

    Limits: `thresholds` as given, else the class `tolerance`, else the class
    the candidate records, else `default_tolerance`, else `exact`
    (`resolve_tolerance`), with `limits` (`min_cosine=`, `min_sqnr_db=`,
    `atol=`, `min_topk=`, `topk=`) overriding the pass limits.
    `topk_outputs` names the outputs judged by top-k agreement (default: those
    that hold probabilities, `class_score_outputs`). `allow_missing_ep`: an EP
    that cannot run here does not make the verdict inconclusive, as long as
    another EP was judged.
    """
    eps = [e.lower() for e in eps]
    if not eps:
        raise UserError("validate needs at least one EP (e.g. --ep cpu)")
    for ep in eps:
        provider_name(ep)
    with tempfile.TemporaryDirectory(prefix="onnxopt-validate-") as tmp:
        tmpdir = Path(tmp)
        ref_path, ref_model = _model_file(ref, tmpdir / "ref.onnx")
        cand_path, cand_model = _model_file(cand, tmpdir / "cand.onnx")
        names = list(model_inputs(ref_model))
        if set(model_inputs(cand_model)) != set(names):
            raise UserError(f"{cand_path}: inputs {sorted(model_inputs(cand_model))} differ from "
                            f"{ref_path}'s {sorted(names)}; validate needs the same input names")
        if topk_outputs is not None:
            outputs = [o.name for o in ref_model.graph.output]
            unknown = [n for n in topk_outputs if n not in outputs]
            if unknown:
                raise UserError(f"--topk-outputs: {', '.join(unknown)} not an output of {ref_path} "
                                f"(outputs: {', '.join(outputs)})")
        if thresholds is None:
            tol, tol_source, tol_warnings = resolve_tolerance(cand_model, tolerance, default_tolerance)
            thresholds = ThresholdSet.for_tolerance(tol, **(limits or {}))
        else:
            tol_source, tol_warnings = "the thresholds argument", []
        feeds, source, warnings = _inputs(ref_model, data, samples, seed, input_shapes)
        if not feeds:
            raise UserError(f"no samples to compare in {data}" if data is not None else "--samples must be >= 1")
        write_inputs(tmpdir / "inputs.npz", feeds, names)
        report = ValidationReport(str(ref_path if not isinstance(ref, onnx.ModelProto) else "<ref model>"),
                                  str(cand_path if not isinstance(cand, onnx.ModelProto) else "<cand model>"),
                                  source, len(feeds), thresholds, tol_source, warnings=tol_warnings + warnings,
                                  allow_missing_ep=allow_missing_ep)
        run = _Run(tmpdir / "inputs.npz", names, len(feeds), threads, warmup, runs, timeout)
        cpu = resolve_interpreter("cpu", (ep_python or {}).get("cpu"))
        if not cpu.available:
            raise UserError(f"the CPU EP cannot run: {cpu.reason}")
        interps = [cpu if ep == "cpu" else resolve_interpreter(ep, (ep_python or {}).get(ep)) for ep in eps]
        if executor is not None:
            _validate_sharded(executor, report, feeds, ref_path, ref_model, cand_path, cand_model, cpu, interps,
                              run, tmpdir, require_no_fallback, topk_outputs)
            return _settle(report)
        ref_run = run.job(cpu.python, ref_path, CPU, timed=True)
        if not ref_run.ok:
            return _settle(_reference_failed(report, _failure(ref_run, "REF on the CPU EP failed"), interps))
        scores = [class_score_outputs(r, topk_outputs) for r in ref_run.outputs]
        plain = run.job(cpu.python, cand_path, CPU, level="disable")
        if plain.ok:
            report.pass_checks = compare_outputs("pass", ref_run.outputs, plain.outputs, thresholds.pass_, scores)
        else:
            report.pass_errors.append(_failure(plain, "CAND on the CPU EP (optimizations off) failed"))
        for interp in progress(interps, desc="validate EPs", total=len(interps), unit="EP"):
            report.eps.append(_validate_ep(interp, run, ref_path, cand_path, cand_model, ref_run, plain, scores,
                                           thresholds, require_no_fallback))
        return _settle(report)


def _reference_failed(report: ValidationReport, error: str, interps: list[EpInterpreter]) -> ValidationReport:
    """REF did not run on the CPU EP: nothing to compare with, so no EP is judged and the candidate is not blamed."""
    report.ref_errors.append(error)
    report.eps = [EpReport(i.ep, "skipped", i.reason) if not i.available else
                  EpReport(i.ep, "inconclusive", "not judged: the original model fails on the CPU EP, "
                           "so there are no reference outputs")
                  for i in interps]
    return report


def _settle(report: ValidationReport) -> ValidationReport:
    """Make the EP blocks agree with the verdict: when the candidate's own error (the pass check) breaks
    the limits, an EP whose own checks passed still carries that candidate, so it fails too."""
    if report.candidate_failed_pass:
        for e in report.eps:
            if e.status == "passed":
                e.status = "failed"
                e.reason = "the candidate's own error breaks the limits (pass check, CAND vs REF on the CPU EP)"
    return report


def _validate_ep(interp: EpInterpreter, run: _Run, ref_path: Path, cand_path: Path,
                 cand_model: onnx.ModelProto, ref_run: WorkerResult, plain: WorkerResult, scores: list[set[str]],
                 thresholds: ThresholdSet, require_no_fallback: bool) -> EpReport:
    """The backend and end-to-end checks, placement and latency on one EP (REF's CPU run reused on CPU)."""
    ep = interp.ep
    if not interp.available:
        return EpReport(ep, "skipped", interp.reason)
    provider = provider_name(ep)
    report = EpReport(ep, interpreter=interp.python, ort_version=interp.ort_version)
    res = run.job(interp.python, cand_path, provider, timed=True, placement=True)
    if res.status == "unavailable":
        report.status, report.reason = "skipped", res.error
        return report
    # REF on this EP: its latency, and its own outputs to tell whether a failure here is the candidate's
    ref_here = ref_run if provider == CPU else run.job(interp.python, ref_path, provider, timed=True)
    if res.ok:
        if plain.ok:
            report.checks += compare_outputs("backend", plain.outputs, res.outputs, thresholds.backend, scores)
        report.checks += compare_outputs("e2e", ref_run.outputs, res.outputs,
                                         thresholds.pass_.looser(thresholds.backend), scores)
        report.placement = read_placement(res, provider, cand_model)

    def original_here() -> tuple[str, list[OutputCheck]]:
        if provider == CPU:
            return "", []
        if not ref_here.ok:
            return _failure(ref_here, f"REF on {ep} failed"), []
        return "", compare_outputs("ref", ref_run.outputs, ref_here.outputs, thresholds.backend, scores)

    cand_error = "" if res.ok else _failure(res, f"CAND on {ep} failed")
    return _conclude(report, cand_error, original_here, ref_here, res, run.runs, run.threads, provider,
                     require_no_fallback)


@dataclass
class _ModelRef:
    """How a shard task finds a model: its bytes in the executor's shared store, or a path on a shared filesystem.

    Models with external weights travel by path (the weights file must be
    visible to every worker at the same path); others once through
    `Executor.share`, written to a file in each task's temporary directory.
    """

    path: str
    blob: Shared | None = None

    def file(self, tmpdir: Path, name: str) -> str:
        if self.blob is None:
            return self.path
        out = tmpdir / name
        out.write_bytes(self.blob.get())
        return str(out)


@dataclass
class _Interp:
    """An EP's interpreter as the driver resolved it; `current` means "the worker's own interpreter".

    `pythonpath` is the driver's $PYTHONPATH (None: unset), under which the
    driver probed the interpreter: a named interpreter's worker gets it instead
    of the task's own (a local Ray instance points PYTHONPATH at the driver's
    packages, which would shadow the EP environment's onnxruntime build).
    """

    ep: str
    python: str
    current: bool
    pythonpath: str | None = None

    def env(self) -> dict[str, str] | None:
        """The environment of this interpreter's worker process (None: inherit the task's)."""
        if self.current:
            return None
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.pythonpath is not None:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def path(self) -> str:
        """The interpreter to start on this worker, which must exist here at the driver's path."""
        if self.current:
            return sys.executable
        if not Path(self.python).exists():
            raise FileNotFoundError(
                f"{self.python} (the {self.ep} EP's interpreter on the driver) does not exist on worker host "
                f"{socket.gethostname()}: the EP's environment must exist at the same path on every node "
                f"(run `onnxopt ep setup {self.ep}` there, or set ONNXOPT_HOME alike)")
        return self.python


@dataclass
class _ShardTask:
    """Accuracy runs over samples [start, stop): REF and CAND (optimizations off) on CPU, CAND on each EP."""

    ref: _ModelRef
    cand: _ModelRef
    feeds: Shared
    start: int
    stop: int
    input_names: list[str]
    cpu: _Interp
    eps: list[_Interp]
    threads: int
    timeout: float
    topk_pass: int
    topk_backend: int
    topk_e2e: int
    topk_outputs: list[str] | None = None


@dataclass
class _ShardResult:
    """Per-sample metrics of one shard, and the runs that did not succeed (status, failure text)."""

    start: int
    stop: int
    ref_failure: tuple[str, str] | None = None
    plain_failure: tuple[str, str] | None = None
    pass_rows: list[dict[str, SampleMetrics]] = field(default_factory=list)
    ep_failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    backend_rows: dict[str, list[dict[str, SampleMetrics]]] = field(default_factory=dict)
    e2e_rows: dict[str, list[dict[str, SampleMetrics]]] = field(default_factory=dict)


def _run_shard(task: _ShardTask) -> _ShardResult:
    """One validation shard on a worker: its samples through every model and EP, reduced to per-sample metrics."""
    out = _ShardResult(task.start, task.stop)
    where = f"samples {task.start}-{task.stop - 1}"
    with tempfile.TemporaryDirectory(prefix="onnxopt-validate-shard-") as tmp:
        tmpdir = Path(tmp)
        feeds = task.feeds.get()[task.start:task.stop]
        write_inputs(tmpdir / "inputs.npz", feeds, task.input_names)
        run = _Run(tmpdir / "inputs.npz", task.input_names, len(feeds), task.threads, 0, 0, task.timeout)
        ref_path, cand_path = task.ref.file(tmpdir, "ref.onnx"), task.cand.file(tmpdir, "cand.onnx")

        def job(interp: _Interp, model: str, provider: str, level: str = "all") -> WorkerResult:
            try:
                python = interp.path()
            except FileNotFoundError as exc:
                return WorkerResult("error", str(exc), "start")
            return run.job(python, Path(model), provider, level=level, env=interp.env())

        ref_run = job(task.cpu, ref_path, CPU)
        if not ref_run.ok:
            out.ref_failure = (ref_run.status, _failure(ref_run, f"REF on the CPU EP failed ({where})"))
            return out
        scores = [class_score_outputs(r, task.topk_outputs) for r in ref_run.outputs]
        plain = job(task.cpu, cand_path, CPU, level="disable")
        if plain.ok:
            out.pass_rows = [sample_metrics(r, c, task.topk_pass, s)
                             for r, c, s in zip(ref_run.outputs, plain.outputs, scores)]
        else:
            out.plain_failure = (plain.status, _failure(
                plain, f"CAND on the CPU EP (optimizations off) failed ({where})"))
        for interp in task.eps:
            res = job(interp, cand_path, provider_name(interp.ep))
            if not res.ok:
                what = res.error if res.status == "unavailable" else _failure(res, f"CAND on {interp.ep} failed ({where})")
                out.ep_failures[interp.ep] = (res.status, what)
                continue
            if plain.ok:
                out.backend_rows[interp.ep] = [sample_metrics(p, c, task.topk_backend, s)
                                               for p, c, s in zip(plain.outputs, res.outputs, scores)]
            out.e2e_rows[interp.ep] = [sample_metrics(r, c, task.topk_e2e, s)
                                       for r, c, s in zip(ref_run.outputs, res.outputs, scores)]
    return out


def _share_model(executor: Executor, path: Path, model: onnx.ModelProto) -> _ModelRef:
    """A model's bytes through the executor's shared store, or its path if its weights are external."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)):
        return _ModelRef(str(path.resolve()))
    return _ModelRef(str(path), executor.share(path.read_bytes()))


def _validate_sharded(executor: Executor, report: ValidationReport, feeds: list[Sample], ref_path: Path,
                      ref_model: onnx.ModelProto, cand_path: Path, cand_model: onnx.ModelProto,
                      cpu: EpInterpreter, interps: list[EpInterpreter], run: _Run, tmpdir: Path,
                      require_no_fallback: bool, topk_outputs: list[str] | None = None) -> None:
    """Fill `report`: accuracy over shards of samples on `executor`, placement and latency on this machine.

    One task per shard of samples (one shard per worker) runs REF and CAND
    (optimizations off) on the CPU EP and CAND on every available EP, and
    returns per-sample metrics; they are merged here in sample order with
    `merge_sample_metrics`, so every metric and verdict equals the
    single-process path's. Latency and placement are measured only here, on
    the machine that will serve the model, after the accuracy work is done and
    from the first sample only. When the candidate fails on an EP, REF runs
    here on the CPU EP and on that EP over all samples, to tell whether the
    original fails there too (as the single-process path does). Workers start each EP's worker with the
    interpreter this process resolved (the same path must exist on every node).
    """
    t = report.thresholds
    runnable = [i for i in interps if i.available]
    shared_feeds = executor.share(feeds)
    ref_ref, cand_ref = _share_model(executor, ref_path, ref_model), _share_model(executor, cand_path, cand_model)

    def as_task_interp(i: EpInterpreter) -> _Interp:
        return _Interp(i.ep, i.python or "", i.source == "current interpreter", os.environ.get("PYTHONPATH"))

    tasks = [_ShardTask(ref_ref, cand_ref, shared_feeds, a, b, run.input_names, as_task_interp(cpu),
                        [as_task_interp(i) for i in runnable], run.threads, run.timeout, t.pass_.topk,
                        t.backend.topk, t.pass_.looser(t.backend).topk, topk_outputs)
             for a, b in shard_bounds(len(feeds), executor.workers)]
    shards = executor.map(_run_shard, tasks, desc="validate shards", unit="shard")
    ref_failed = next((s.ref_failure for s in shards if s.ref_failure), None)
    if ref_failed:
        _reference_failed(report, ref_failed[1], interps)
        return
    plain_failed = next((s.plain_failure for s in shards if s.plain_failure), None)
    if plain_failed:
        report.pass_errors.append(plain_failed[1])
    else:
        report.pass_checks = merge_sample_metrics("pass", [r for s in shards for r in s.pass_rows], t.pass_)
    write_inputs(tmpdir / "first.npz", feeds[:1], run.input_names)
    timing = dataclasses.replace(run, inputs_npz=tmpdir / "first.npz", samples=min(1, len(feeds)))
    ref_cpu = timing.job(cpu.python, ref_path, CPU, timed=True, outputs=False)
    for interp in progress(interps, desc="validate EPs (latency)", total=len(interps), unit="EP"):
        report.eps.append(_ep_from_shards(interp, shards, timing, run, cpu, ref_path, cand_path, cand_model,
                                          ref_cpu, plain_failed is None, t, require_no_fallback, topk_outputs))


def _ep_from_shards(interp: EpInterpreter, shards: list[_ShardResult], timing: _Run, run: _Run,
                    cpu: EpInterpreter, ref_path: Path, cand_path: Path, cand_model: onnx.ModelProto,
                    ref_cpu: WorkerResult, plain_ok: bool, thresholds: ThresholdSet, require_no_fallback: bool,
                    topk_outputs: list[str] | None) -> EpReport:
    """One EP's report from the shards' metrics, with placement and latency measured on this machine."""
    ep = interp.ep
    if not interp.available:
        return EpReport(ep, "skipped", interp.reason)
    provider = provider_name(ep)
    report = EpReport(ep, interpreter=interp.python, ort_version=interp.ort_version)
    failures = [s.ep_failures[ep] for s in shards if ep in s.ep_failures]
    unavailable = next((f for f in failures if f[0] == "unavailable"), None)
    if unavailable:
        report.status, report.reason = "skipped", unavailable[1]
        return report
    cand_error = failures[0][1] if failures else ""
    if not failures:
        if plain_ok:
            report.checks += merge_sample_metrics("backend", [r for s in shards for r in s.backend_rows[ep]],
                                                  thresholds.backend)
        report.checks += merge_sample_metrics("e2e", [r for s in shards for r in s.e2e_rows[ep]],
                                              thresholds.pass_.looser(thresholds.backend))
    res = timing.job(interp.python, cand_path, provider, timed=True, placement=True, outputs=False)
    if res.status == "unavailable":
        report.status = "skipped"
        report.reason = f"runs on the workers but not on this machine, where latency is measured: {res.error}"
        return report
    if not res.ok and not cand_error:
        cand_error = _failure(res, f"CAND on {ep} failed (latency)")
    report.placement = read_placement(res, provider, cand_model) if res.ok else None
    ref_lat = ref_cpu if ep == "cpu" else timing.job(interp.python, ref_path, provider, timed=True, outputs=False)

    def original_here() -> tuple[str, list[OutputCheck]]:
        if provider == CPU:
            return "", []
        ref_ep = run.job(interp.python, ref_path, provider)
        if not ref_ep.ok:
            return _failure(ref_ep, f"REF on {ep} failed"), []
        ref_base = run.job(cpu.python, ref_path, CPU)
        if not ref_base.ok:
            return _failure(ref_base, "REF on the CPU EP failed"), []
        scores = [class_score_outputs(r, topk_outputs) for r in ref_base.outputs]
        return "", compare_outputs("ref", ref_base.outputs, ref_ep.outputs, thresholds.backend, scores)

    return _conclude(report, cand_error, original_here, ref_lat, res, timing.runs, timing.threads, provider,
                     require_no_fallback)


def _conclude(report: EpReport, cand_error: str, original_here: Callable[[], tuple[str, list[OutputCheck]]],
              ref_lat: WorkerResult, res: WorkerResult, runs: int, threads: int, provider: str,
              require_no_fallback: bool) -> EpReport:
    """Status, latency and the no-fallback rule of one EP, once its checks and placement are in.

    When the candidate fails here (a crash or a broken limit), `original_here()`
    says whether the original fails here too: it crashes on this EP, or its
    own outputs here differ from its CPU outputs beyond the backend limits.
    Then the EP is `inconclusive`, not the candidate's failure.
    """
    if cand_error:
        report.errors.append(cand_error)
    if cand_error or any(c.violations for c in report.checks):
        ref_error, report.ref_checks = original_here()
        broken = [c for c in report.ref_checks if c.violations]
        if ref_error or broken:
            why = ref_error or "; ".join(f"{c.output}: {', '.join(c.violations)}" for c in broken)
            report.status = "inconclusive"
            report.reason = f"the original fails here too, so the candidate is not blamed: {why}"
        else:
            report.status = "failed"
    elif not ref_lat.ok:
        report.notes.append("the original does not run here (the candidate does): "
                            + _failure(ref_lat, f"REF on {report.ep} failed"))
    report.latency = Latency(_median(ref_lat.latency_ms) if ref_lat.ok else None,
                             _median(res.latency_ms) if res.ok else None, runs, threads)
    if require_no_fallback and report.placement and report.placement.fallback and provider != CPU:
        report.status = "failed"
        report.errors.append(f"--require-no-fallback: {len(report.placement.fallback)} node(s) ran on the CPU EP")
    return report


def _model_file(model: str | os.PathLike | onnx.ModelProto, spill: Path) -> tuple[Path, onnx.ModelProto]:
    """A path the workers can open, and the model (loaded without external weights) for its inputs."""
    if isinstance(model, onnx.ModelProto):
        save_model(model, spill)
        return spill, model
    path = Path(model)
    return path, load_model(path, load_external=False)


def _inputs(model: onnx.ModelProto, data, samples: int, seed: int,
            input_shapes: dict | None) -> tuple[list[Sample], str, list[str]]:
    """The samples to run: from calibration data, or seeded random ones with a warning."""
    if input_shapes:
        from onnxopt.pinning import check_pinnable

        check_pinnable(model, input_shapes)  # unknown names and wrong ranks are errors, never ignored
    if data is not None:
        source = CalibrationData(data, model, limit=samples)
        feeds = list(progress(source, desc="loading samples", total=len(source), unit="sample"))
        where = str(data) if isinstance(data, (str, os.PathLike)) else "given samples"
        return feeds, f"{len(feeds)} samples from {where}", []
    feeds = seeded_inputs(model, samples, seed, input_shapes)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds[0].items()) if feeds else ""
    return (feeds, f"{len(feeds)} seeded random samples (seed {seed}): {shapes}",
            ["random inputs are weak evidence of accuracy; pass --data with real samples"])


def parse_eps(text: str) -> list[str]:
    """`"cpu,openvino"` -> `["cpu", "openvino"]`, checking each name."""
    eps = [e.strip().lower() for e in text.split(",") if e.strip()]
    for ep in eps:
        provider_name(ep)
    return eps


def parse_ep_python(specs: list[str] | None) -> dict[str, str]:
    """`["openvino=/venv/bin/python"]` -> `{"openvino": "/venv/bin/python"}`."""
    out = {}
    for spec in specs or []:
        ep, sep, py = spec.partition("=")
        if not sep:
            raise UserError(f"--ep-python {spec!r}: write EP=PATH, e.g. openvino=/opt/ov/bin/python")
        provider_name(ep)
        out[ep.lower()] = py
    return out


def add_validation_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Options of a validation: data, thresholds, runs, interpreters, report.

    `optimize` adds them with `prefix="validate-"` (`--validate-data`, ...) so
    they cannot clash with its own `--data` or `--report`.
    """
    g = parser.add_argument_group("validation")

    def add(flag: str, **kw) -> None:
        dest = kw.pop("dest", flag.replace("-", "_"))
        g.add_argument(f"--{prefix}{flag}", dest=(prefix + dest).replace("-", "_"), **kw)

    add("data", help="calibration-format inputs: a directory of .npz or one stacked .npz")
    add("samples", type=int, default=8, help="samples to compare (default 8)")
    add("seed", type=int, default=0, help="seed of the random inputs when no data is given")
    add("input-shape", action="append", metavar="NAME=D0xD1..",
        help="pin a dynamic input shape for random inputs (repeatable)")
    add("tolerance", choices=sorted(PASS_THRESHOLDS),
        help="what the passes were allowed to change (default: the class the candidate records in its "
             "metadata, written by optimize; else the pipeline's class; else exact)")
    add("min-cosine", type=float, help="override the pass limit on cosine similarity")
    add("min-sqnr", type=float, dest="min_sqnr_db", help="override the pass limit on SQNR (dB)")
    add("max-abs", type=float, dest="atol", help="a hard limit on the max abs error of the passes")
    add("min-topk", type=float, help="override the pass limit on top-k agreement")
    add("topk", type=int, default=1, help="k of the top-k agreement (default 1)")
    add("topk-outputs", metavar="NAME,...", type=_names,
        help="outputs judged by top-k agreement along their last axis longer than 1 (default: outputs whose "
             "rows are probabilities, as softmax writes them); '' for none")
    add("allow-missing-ep", action="store_true",
        help="an EP asked for that cannot run here does not stop a pass (another EP must be judged)")
    add("require-no-fallback", action="store_true",
        help="fail when a node of CAND runs on the CPU EP instead of the target EP")
    add("threads", type=int, default=1, help="intra-op threads of every session (default 1)")
    add("warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    add("runs", type=int, default=10, help="timed runs; latency is their median (default 10)")
    add("timeout", type=float, default=600.0, help="seconds before a worker is killed")
    add("ep-python", action="append", metavar="EP=PATH",
        help="interpreter that runs an EP's worker (also ONNXOPT_EP_PYTHON_<EP>)")
    add("report", help="write the validation report as JSON here")


def _names(text: str) -> list[str]:
    """`"a,b"` -> `["a", "b"]`; `""` -> `[]`."""
    return [n.strip() for n in text.split(",") if n.strip()]


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `onnxopt validate REF CAND`."""
    parser.add_argument("ref", help="the original model")
    parser.add_argument("cand", help="the optimized model")
    parser.add_argument("--ep", default="cpu", help="comma-separated EPs: cpu,openvino,cuda (default cpu)")
    add_validation_options(parser)
    add_executor_arguments(parser)  # where the accuracy runs go; latency is always measured here


def validate_from_args(ref, cand, eps: list[str], args: argparse.Namespace, tolerance: str | None = None,
                       prefix: str = "", executor: Executor | None = None) -> ValidationReport:
    """Run `validate` with the options of `add_validation_options(parser, prefix)`.

    The tolerance class is the option's, else the one the candidate records,
    else `tolerance` (for `optimize`, the pipeline's loosest), else exact.
    `executor` runs the accuracy shards; the in-process local executor (the
    CLI default) validates as without one, from this process.
    """
    if isinstance(executor, LocalExecutor) and executor.workers == 1:
        executor = None
    def opt(name: str):
        return getattr(args, (prefix + name).replace("-", "_"))

    limits = dict(atol=opt("atol"), min_cosine=opt("min_cosine"), min_sqnr_db=opt("min_sqnr_db"),
                  min_topk=opt("min_topk"), topk=opt("topk"))
    report = validate(ref, cand, eps, data=opt("data"), samples=opt("samples"), tolerance=opt("tolerance"),
                      limits=limits, default_tolerance=tolerance, topk_outputs=opt("topk_outputs"),
                      allow_missing_ep=opt("allow_missing_ep"), require_no_fallback=opt("require_no_fallback"),
                      seed=opt("seed"), input_shapes=parse_input_shapes(opt("input_shape")),
                      threads=opt("threads"), warmup=opt("warmup"), runs=opt("runs"), timeout=opt("timeout"),
                      ep_python=parse_ep_python(opt("ep_python")), executor=executor)
    if opt("tolerance"):
        report.tolerance_source = f"--{prefix}tolerance"
    return report


def finish(report: ValidationReport, report_path: str | None) -> int:
    """Print the table, write the JSON report if asked, return the exit code.

    0 only when the verdict is PASSED; 1 when it is FAILED or INCONCLUSIVE
    (the original fails too, or an EP asked for did not run).
    """
    print(report.format_table())
    if report_path:
        report.write_json(report_path)
    return 0 if report.passed else 1


def run_validate_command(args: argparse.Namespace) -> int:
    """`onnxopt validate`: 0 when the verdict is PASSED, 1 when FAILED or INCONCLUSIVE (see `finish`)."""
    for path in (args.ref, args.cand):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such model file")
    eps = parse_eps(args.ep)
    with executor_from_args(args) as executor:
        report = validate_from_args(args.ref, args.cand, eps, args, executor=executor)
    return finish(report, args.report)
