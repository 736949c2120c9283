"""The sharded run of `validate`: accuracy in shards of samples on an executor, latency and placement here.

One task per shard of samples (one shard per worker) runs the same worker runs
as the local run (`run_reference`, `run_candidate` of
`onnxopt.verify.validation_runs`) and returns their per-sample metric rows;
they are merged here in sample order with `merge_sample_metrics`, so every
metric and verdict equals the local run's. Latency and placement are measured
only here, on the machine that will serve the model, after the accuracy work
is done and from the first sample only. Workers start each EP's worker with
the interpreter this process resolved (the same path must exist on every node).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import external_data_helper

from onnxopt.data.samples import Sample
from onnxopt.data.sharded_calibration import shard_bounds
from onnxopt.report.progress import progress
from onnxopt.runtime.executor import Executor, Shared
from onnxopt.verify.comparison import OutputCheck, class_score_outputs, merge_sample_metrics
from onnxopt.verify.ep import provider_name
from onnxopt.verify.ep.envs import EpInterpreter
from onnxopt.verify.ep.runner import WorkerResult, write_inputs
from onnxopt.verify.placement import CPU, read_placement
from onnxopt.verify.tolerance import ThresholdSet
from onnxopt.verify.validation_report import EpReport, ValidationReport
from onnxopt.verify.validation_runs import (
    Measured,
    Rows,
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
        """A path to the model on this worker."""
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

    @classmethod
    def of(cls, interp: EpInterpreter) -> _Interp:
        """The task's view of an interpreter the driver resolved."""
        return cls(interp.ep, interp.python or "", interp.source == "current interpreter", os.environ.get("PYTHONPATH"))

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
                f"(run `onnxopt ep setup {self.ep}` there, or set ONNXOPT_HOME alike)"
            )
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
    pass_rows: Rows = field(default_factory=list)
    ep_failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    backend_rows: dict[str, Rows] = field(default_factory=dict)
    e2e_rows: dict[str, Rows] = field(default_factory=dict)


def _run_shard(task: _ShardTask) -> _ShardResult:
    """One validation shard on a worker: its samples through every model and EP, reduced to per-sample metrics."""
    out = _ShardResult(task.start, task.stop)
    where = f"samples {task.start}-{task.stop - 1}"
    with tempfile.TemporaryDirectory(prefix="onnxopt-validate-shard-") as tmp:
        tmpdir = Path(tmp)
        feeds = task.feeds.get()[task.start : task.stop]
        write_inputs(tmpdir / "inputs.npz", feeds, task.input_names)
        run = WorkerRuns(tmpdir / "inputs.npz", task.input_names, len(feeds), task.threads, 0, 0, task.timeout)
        ref_path, cand_path = task.ref.file(tmpdir, "ref.onnx"), task.cand.file(tmpdir, "cand.onnx")

        def start(interp: _Interp, model: str | Path, provider: str, role: str) -> WorkerResult:
            try:
                python = interp.path()
            except FileNotFoundError as exc:
                return WorkerResult("error", str(exc), "start")
            return run.job(python, model, provider, level=level(role), env=interp.env())

        base = run_reference(start, task.cpu, ref_path, cand_path, task.topk_pass, task.topk_outputs)
        if not base.ref.ok:
            out.ref_failure = (base.ref.status, failure(base.ref, f"REF on the CPU EP failed ({where})"))
            return out
        assert base.plain is not None, "run_reference runs CAND once REF ran"
        if base.plain.ok:
            out.pass_rows = base.pass_rows
        else:
            what = failure(base.plain, f"CAND on the CPU EP (optimizations off) failed ({where})")
            out.plain_failure = (base.plain.status, what)
        for interp in task.eps:
            cand = run_candidate(start, interp, interp.ep, cand_path, base, task.topk_backend, task.topk_e2e)
            res = cand.result
            if not res.ok:
                what = (
                    res.error if res.status == "unavailable" else failure(res, f"CAND on {interp.ep} failed ({where})")
                )
                out.ep_failures[interp.ep] = (res.status, what)
                continue
            if cand.backend_rows is not None:
                out.backend_rows[interp.ep] = cand.backend_rows
            out.e2e_rows[interp.ep] = cand.e2e_rows
    return out


def _share_model(executor: Executor, path: Path, model: onnx.ModelProto) -> _ModelRef:
    """A model's bytes through the executor's shared store, or its path if its weights are external."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in external_data_helper._get_all_tensors(model)):
        return _ModelRef(str(path.resolve()))
    return _ModelRef(str(path), executor.share(path.read_bytes()))


@dataclass
class _Here:
    """What the driver needs to finish each EP's report on this machine after the shards are in."""

    run: WorkerRuns  # all samples, for re-running REF when the candidate fails on an EP
    timing: WorkerRuns  # the first sample, for latency and placement
    cpu: EpInterpreter
    ref_path: Path
    cand_path: Path
    cand_model: onnx.ModelProto
    ref_cpu: WorkerResult
    plain_ok: bool
    thresholds: ThresholdSet
    require_no_fallback: bool
    topk_outputs: list[str] | None


def validate_sharded(
    executor: Executor,
    report: ValidationReport,
    feeds: list[Sample],
    ref: tuple[Path, onnx.ModelProto],
    cand: tuple[Path, onnx.ModelProto],
    cpu: EpInterpreter,
    interps: list[EpInterpreter],
    run: WorkerRuns,
    tmpdir: Path,
    require_no_fallback: bool,
    topk_outputs: list[str] | None = None,
) -> None:
    """Fill `report`: accuracy over shards of samples on `executor`, placement and latency on this machine.

    When the candidate fails on an EP, REF runs here on the CPU EP and on that
    EP over all samples, to tell whether the original fails there too (as the
    local run does).
    """
    t = report.thresholds
    (ref_path, ref_model), (cand_path, cand_model) = ref, cand
    shared_feeds = executor.share(feeds)
    ref_ref, cand_ref = _share_model(executor, ref_path, ref_model), _share_model(executor, cand_path, cand_model)
    runnable = [_Interp.of(i) for i in interps if i.available]
    topks = (t.pass_.topk, t.backend.topk, t.pass_.looser(t.backend).topk)
    tasks = [
        _ShardTask(
            ref_ref,
            cand_ref,
            shared_feeds,
            a,
            b,
            run.input_names,
            _Interp.of(cpu),
            runnable,
            run.threads,
            run.timeout,
            *topks,
            topk_outputs,
        )
        for a, b in shard_bounds(len(feeds), executor.workers)
    ]
    shards = executor.map(_run_shard, tasks, desc="validate shards", unit="shard")
    ref_failed = next((s.ref_failure for s in shards if s.ref_failure), None)
    if ref_failed:
        reference_failed(report, ref_failed[1], interps)
        return
    plain_failed = next((s.plain_failure for s in shards if s.plain_failure), None)
    if plain_failed:
        report.pass_errors.append(plain_failed[1])
    else:
        report.pass_checks = merge_sample_metrics("pass", [r for s in shards for r in s.pass_rows], t.pass_)
    write_inputs(tmpdir / "first.npz", feeds[:1], run.input_names)
    timing = dataclasses.replace(run, inputs_npz=tmpdir / "first.npz", samples=min(1, len(feeds)))
    ref_cpu = timing.job(cpu.executable, ref_path, CPU, timed=True, outputs=False)
    here = _Here(
        run,
        timing,
        cpu,
        ref_path,
        cand_path,
        cand_model,
        ref_cpu,
        plain_failed is None,
        t,
        require_no_fallback,
        topk_outputs,
    )
    for interp in progress(interps, desc="validate EPs (latency)", total=len(interps), unit="EP"):
        report.eps.append(_ep_from_shards(interp, shards, here))


def _ep_from_shards(interp: EpInterpreter, shards: list[_ShardResult], here: _Here) -> EpReport:
    """One EP's report from the shards' metrics, with placement and latency measured on this machine."""
    report = new_ep_report(interp)
    if not interp.available:
        return report
    ep, provider = interp.ep, provider_name(interp.ep)
    failures = [s.ep_failures[ep] for s in shards if ep in s.ep_failures]
    unavailable = next((f for f in failures if f[0] == "unavailable"), None)
    if unavailable:
        report.status, report.reason = "skipped", unavailable[1]
        return report
    cand_error = failures[0][1] if failures else ""
    if not failures:
        backend = [r for s in shards for r in s.backend_rows[ep]] if here.plain_ok else None
        report.checks += ep_checks(backend, [r for s in shards for r in s.e2e_rows[ep]], here.thresholds)
    res = here.timing.job(interp.executable, here.cand_path, provider, timed=True, placement=True, outputs=False)
    if res.status == "unavailable":
        report.status = "skipped"
        report.reason = f"runs on the workers but not on this machine, where latency is measured: {res.error}"
        return report
    if not res.ok and not cand_error:
        cand_error = failure(res, f"CAND on {ep} failed (latency)")
    report.placement = read_placement(res, provider, here.cand_model) if res.ok else None
    ref_lat = (
        here.ref_cpu
        if ep == "cpu"
        else here.timing.job(interp.executable, here.ref_path, provider, timed=True, outputs=False)
    )

    original_here = functools.partial(_original_here, interp, provider, here)
    measured = Measured(ref_lat, res, here.timing.runs, here.timing.threads)
    return conclude(report, cand_error, original_here, measured, provider, here.require_no_fallback)


def _original_here(interp: EpInterpreter, provider: str, here: _Here) -> tuple[str, list[OutputCheck]]:
    """REF on this EP and on the CPU EP over all samples, run here: whether the original fails on this EP too."""
    if provider == CPU:
        return "", []
    ref_ep = here.run.job(interp.executable, here.ref_path, provider)
    if not ref_ep.ok:
        return failure(ref_ep, f"REF on {interp.ep} failed"), []
    ref_base = here.run.job(here.cpu.executable, here.ref_path, CPU)
    if not ref_base.ok:
        return failure(ref_base, "REF on the CPU EP failed"), []
    scores = [class_score_outputs(r, here.topk_outputs) for r in ref_base.outputs]
    return original_checks(ref_base, ref_ep, interp.ep, here.thresholds, scores)
