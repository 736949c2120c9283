"""The worker runs of one validation and what they reduce to, shared by the local and the sharded run.

Over a set of samples, `run_reference` runs REF and CAND (graph optimizations
off) on the CPU EP and `run_candidate` runs CAND on one EP; both turn the
outputs into per-sample metric rows (`onnxopt.verify.comparison`). The local
run (`validate_local`) calls them once over all samples, from this process,
with latency and placement measured in the same worker runs; the sharded run
(`validate_sharded`) calls them in each shard task and merges the rows. Once an
EP's checks and placement are in, `conclude` decides its status the same way
for both.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from onnxopt.verify.comparison import (
    OutputCheck,
    SampleMetrics,
    class_score_outputs,
    compare_outputs,
    merge_sample_metrics,
    sample_metrics,
)
from onnxopt.verify.ep import EP_PROVIDERS, provider_name
from onnxopt.verify.ep.envs import EpInterpreter
from onnxopt.verify.ep.runner import WorkerJob, WorkerResult, run_worker
from onnxopt.verify.placement import CPU
from onnxopt.verify.tolerance import ThresholdSet
from onnxopt.verify.validation_report import EpReport, Latency, ValidationReport

Rows = list[dict[str, SampleMetrics]]
"""Per-sample metrics of every output, in sample order."""


class StartRun(Protocol):
    """Start one worker run: `role` is `ref` or `plain` (on the CPU EP) or `cand` (CAND on an EP).

    The caller decides what else a role's run measures (latency, placement)
    and how `interp` becomes an interpreter and environment.
    """

    def __call__(self, interp: Any, model: str | Path, provider: str, role: str) -> WorkerResult: ...


@dataclass
class WorkerRuns:
    """What it takes to start workers over stored samples: the inputs file and run settings."""

    inputs_npz: Path
    input_names: list[str]
    samples: int
    threads: int
    warmup: int
    runs: int
    timeout: float

    def job(
        self,
        python: str,
        model: str | Path,
        provider: str,
        level: str = "all",
        timed: bool = False,
        placement: bool = False,
        outputs: bool = True,
        env: dict[str, str] | None = None,
    ) -> WorkerResult:
        """Run `model` on `provider` with interpreter `python`, timed and with placement if asked."""
        options = {"num_of_threads": self.threads} if provider == EP_PROVIDERS["openvino"] else {}
        job = WorkerJob(
            str(model),
            provider,
            options,
            level,
            self.threads,
            self.warmup if timed else 0,
            self.runs if timed else 0,
            placement,
            want_outputs=outputs,
        )
        return run_worker(python, job, self.inputs_npz, self.input_names, self.samples, timeout=self.timeout, env=env)


@dataclass
class ReferenceRuns:
    """REF and CAND (optimizations off) on the CPU EP over some samples, and the pass check's rows.

    `scores[i]`: the class-score outputs of sample i, from REF's outputs, so
    every check of a sample judges top-k on the same outputs.
    """

    ref: WorkerResult
    plain: WorkerResult | None = None
    scores: list[set[str]] = field(default_factory=list)
    pass_rows: Rows = field(default_factory=list)


@dataclass
class CandidateRun:
    """CAND on one EP over some samples, and the rows of its backend check (None: no plain run) and e2e check."""

    result: WorkerResult
    backend_rows: Rows | None = None
    e2e_rows: Rows = field(default_factory=list)


def level(role: str) -> str:
    """The graph optimization level of a role's run: CAND's `plain` run has optimizations off."""
    return "disable" if role == "plain" else "all"


def rows(refs: list[dict], cands: list[dict], topk: int, scores: list[set[str]]) -> Rows:
    """Per-sample metrics of `cands` against `refs`."""
    return [sample_metrics(r, c, topk, s) for r, c, s in zip(refs, cands, scores)]


def run_reference(
    start: StartRun, cpu: Any, ref: str | Path, cand: str | Path, topk: int, topk_outputs: list[str] | None
) -> ReferenceRuns:
    """REF on the CPU EP, then (if it ran) CAND with optimizations off and the pass check's rows."""
    out = ReferenceRuns(start(cpu, ref, CPU, "ref"))
    if not out.ref.ok:
        return out
    out.scores = [class_score_outputs(r, topk_outputs) for r in out.ref.outputs]
    out.plain = start(cpu, cand, CPU, "plain")
    if out.plain.ok:
        out.pass_rows = rows(out.ref.outputs, out.plain.outputs, topk, out.scores)
    return out


def run_candidate(
    start: StartRun, interp: Any, ep: str, cand: str | Path, base: ReferenceRuns, topk_backend: int, topk_e2e: int
) -> CandidateRun:
    """CAND on `ep`, and its rows against CAND on the CPU EP (backend) and against REF (e2e)."""
    res = start(interp, cand, provider_name(ep), "cand")
    out = CandidateRun(res)
    if res.ok:
        if base.plain is not None and base.plain.ok:
            out.backend_rows = rows(base.plain.outputs, res.outputs, topk_backend, base.scores)
        out.e2e_rows = rows(base.ref.outputs, res.outputs, topk_e2e, base.scores)
    return out


def ep_checks(backend_rows: Rows | None, e2e_rows: Rows, limits: ThresholdSet) -> list[OutputCheck]:
    """An EP's backend checks (when CAND ran with optimizations off) and end-to-end checks from their rows."""
    out = merge_sample_metrics("backend", backend_rows, limits.backend) if backend_rows is not None else []
    return out + merge_sample_metrics("e2e", e2e_rows, limits.pass_.looser(limits.backend))


def original_checks(
    ref_cpu: WorkerResult, ref_ep: WorkerResult, ep: str, limits: ThresholdSet, scores: list[set[str]]
) -> tuple[str, list[OutputCheck]]:
    """Whether the original fails on `ep`: its failure there, or REF there against REF on the CPU EP."""
    if not ref_ep.ok:
        return failure(ref_ep, f"REF on {ep} failed"), []
    return "", compare_outputs("ref", ref_cpu.outputs, ref_ep.outputs, limits.backend, scores)


def failure(res: WorkerResult, what: str) -> str:
    """`what: error`, with the tail of the worker's stderr when it crashed."""
    text = f"{what}: {res.error}"
    if res.stderr_tail and res.status == "error":
        text += "\n    stderr: " + res.stderr_tail[-600:].replace("\n", "\n    ")
    return text


def median(values: list[float]) -> float | None:
    """The median of `values`, None for none."""
    return statistics.median(values) if values else None


def new_ep_report(interp: EpInterpreter) -> EpReport:
    """An EP's report before its runs: `skipped` with the reason if its interpreter is not available."""
    if not interp.available:
        return EpReport(interp.ep, "skipped", interp.reason)
    return EpReport(interp.ep, interpreter=interp.executable, ort_version=interp.ort_version)


def reference_failed(report: ValidationReport, error: str, interps: list[EpInterpreter]) -> ValidationReport:
    """REF did not run on the CPU EP: nothing to compare with, so no EP is judged and the candidate is not blamed."""
    report.ref_errors.append(error)
    report.eps = [
        EpReport(i.ep, "skipped", i.reason)
        if not i.available
        else EpReport(
            i.ep,
            "inconclusive",
            "not judged: the original model fails on the CPU EP, so there are no reference outputs",
        )
        for i in interps
    ]
    return report


@dataclass
class Measured:
    """The runs on the machine that serves the model: REF's and CAND's latency runs, and their settings."""

    ref: WorkerResult
    cand: WorkerResult
    runs: int
    threads: int


def conclude(
    report: EpReport,
    cand_error: str,
    original_here: Callable[[], tuple[str, list[OutputCheck]]],
    measured: Measured,
    provider: str,
    require_no_fallback: bool,
) -> EpReport:
    """Status, latency and the no-fallback rule of one EP, once its checks and placement are in.

    When the candidate fails here (a crash or a broken limit), `original_here()`
    says whether the original fails here too: it crashes on this EP, or its
    own outputs here differ from its CPU outputs beyond the backend limits.
    Then the EP is `inconclusive`, not the candidate's failure.
    """
    if cand_error:
        report.errors.append(cand_error)
    if cand_error or any(c.violations for c in report.checks):
        _blame(report, original_here)
    elif not measured.ref.ok:
        report.notes.append(
            "the original does not run here (the candidate does): "
            + failure(measured.ref, f"REF on {report.ep} failed")
        )
    report.latency = Latency(
        median(measured.ref.latency_ms) if measured.ref.ok else None,
        median(measured.cand.latency_ms) if measured.cand.ok else None,
        measured.runs,
        measured.threads,
    )
    if require_no_fallback and report.placement and report.placement.fallback and provider != CPU:
        report.status = "failed"
        report.errors.append(f"--require-no-fallback: {len(report.placement.fallback)} node(s) ran on the CPU EP")
    return report


def _blame(report: EpReport, original_here: Callable[[], tuple[str, list[OutputCheck]]]) -> None:
    """The candidate fails here: `inconclusive` if the original fails here too, else `failed`."""
    ref_error, report.ref_checks = original_here()
    broken = [c for c in report.ref_checks if c.violations]
    if ref_error or broken:
        why = ref_error or "; ".join(f"{c.output}: {', '.join(c.violations)}" for c in broken)
        report.status = "inconclusive"
        report.reason = f"the original fails here too, so the candidate is not blamed: {why}"
    else:
        report.status = "failed"
