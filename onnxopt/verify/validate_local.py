"""The local run of `validate`: every worker started from this process, over all samples at once.

REF on the CPU EP is timed (REF's CPU latency); CAND on each EP is timed and
its placement read in the same run that gives its outputs. REF also runs on
each other EP, for its latency and to tell a candidate's failure there from
the original's.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxopt.report.progress import progress
from onnxopt.verify.comparison import OutputCheck, merge_sample_metrics
from onnxopt.verify.ep import provider_name
from onnxopt.verify.ep.envs import EpInterpreter
from onnxopt.verify.ep.runner import WorkerResult
from onnxopt.verify.placement import CPU, read_placement
from onnxopt.verify.tolerance import ThresholdSet
from onnxopt.verify.validation_report import EpReport, ValidationReport
from onnxopt.verify.validation_runs import (
    Measured,
    ReferenceRuns,
    StartRun,
    WorkerRuns,
    conclude,
    ep_checks,
    failure,
    level,
    new_ep_report,
    original_checks,
    reference_failed,
    run_candidate,
    run_reference,
)


def validate_local(
    report: ValidationReport,
    ref_path: Path,
    cand_path: Path,
    cand_model: onnx.ModelProto,
    cpu: EpInterpreter,
    interps: list[EpInterpreter],
    run: WorkerRuns,
    require_no_fallback: bool,
    topk_outputs: list[str] | None,
) -> None:
    """Fill `report` from runs started here: the pass check, then one `EpReport` per EP in `interps`."""
    t = report.thresholds

    def start(interp: EpInterpreter, model: str | Path, provider: str, role: str) -> WorkerResult:
        return run.job(interp.executable, model, provider, level(role), timed=role != "plain", placement=role == "cand")

    base = run_reference(start, cpu, ref_path, cand_path, t.pass_.topk, topk_outputs)
    if not base.ref.ok:
        reference_failed(report, failure(base.ref, "REF on the CPU EP failed"), interps)
        return
    assert base.plain is not None, "run_reference runs CAND once REF ran"
    if base.plain.ok:
        report.pass_checks = merge_sample_metrics("pass", base.pass_rows, t.pass_)
    else:
        report.pass_errors.append(failure(base.plain, "CAND on the CPU EP (optimizations off) failed"))
    for interp in progress(interps, desc="validate EPs", total=len(interps), unit="EP"):
        report.eps.append(
            _validate_ep(interp, start, run, ref_path, cand_path, cand_model, base, t, require_no_fallback)
        )


def _validate_ep(
    interp: EpInterpreter,
    start: StartRun,
    run: WorkerRuns,
    ref_path: Path,
    cand_path: Path,
    cand_model: onnx.ModelProto,
    base: ReferenceRuns,
    thresholds: ThresholdSet,
    require_no_fallback: bool,
) -> EpReport:
    """The backend and end-to-end checks, placement and latency on one EP (REF's CPU run reused on CPU)."""
    report = new_ep_report(interp)
    if not interp.available:
        return report
    ep, provider = interp.ep, provider_name(interp.ep)
    looser = thresholds.pass_.looser(thresholds.backend)
    cand = run_candidate(start, interp, ep, cand_path, base, thresholds.backend.topk, looser.topk)
    res = cand.result
    if res.status == "unavailable":
        report.status, report.reason = "skipped", res.error
        return report
    # REF on this EP: its latency, and its own outputs to tell whether a failure here is the candidate's
    ref_here = base.ref if provider == CPU else run.job(interp.executable, ref_path, provider, timed=True)
    if res.ok:
        report.checks += ep_checks(cand.backend_rows, cand.e2e_rows, thresholds)
        report.placement = read_placement(res, provider, cand_model)

    def original_here() -> tuple[str, list[OutputCheck]]:
        if provider == CPU:
            return "", []
        return original_checks(base.ref, ref_here, ep, thresholds, base.scores)

    cand_error = "" if res.ok else failure(res, f"CAND on {ep} failed")
    measured = Measured(ref_here, res, run.runs, run.threads)
    return conclude(report, cand_error, original_here, measured, provider, require_no_fallback)
