"""`onnxopt optimize-many MANIFEST`: optimize a fleet of models, one executor task per model.

The manifest (TOML, see `onnxopt.cli.manifest`) lists models, pipelines,
calibration sets and outputs. Models reach the workers by path (the manifest's
filesystem must be shared with them), and each worker writes its own output
atomically. One model's failure does not stop the others: it is a row in the
summary table and makes the exit code 1. A bad manifest is a user error (exit 2)
before any work.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.api import optimize
from onnxopt.cli.errors import EXIT_CHECK, EXIT_INTERNAL, EXIT_OK, save_reproducer
from onnxopt.cli.logs import add_logging_options
from onnxopt.cli.manifest import ModelJob, load_manifest
from onnxopt.errors import UserError
from onnxopt.ir.model_io import check_output_path, data_file_of
from onnxopt.report.json_report import write_json
from onnxopt.report.tables import human_count, table
from onnxopt.runtime.executor import Executor, add_executor_arguments, executor_from_args
from onnxopt.verify.gate import GateFailed

EPILOG = """\
examples:
  onnxopt optimize-many fleet.toml
  onnxopt optimize-many fleet.toml --workers 4 --report fleet.json
  onnxopt optimize-many fleet.toml --executor ray --ray-address auto
a manifest:
  [defaults]
  pipeline = "fold,fuse"
  output_dir = "optimized"
  [[model]]
  input = "models/det.onnx"
  calibration = "calib/det"
  input_shapes = { x = [1, 3, 640, 640] }
"""


@dataclass
class JobResult:
    """What happened to one model: status 'ok', 'check failed', 'rejected' (the save gate refused the
    result: nothing written, a reproducer saved) or 'error'."""

    name: str
    status: str
    output: str | None = None
    nodes: tuple[int, int] | None = None
    parameters: tuple[int, int] | None = None
    seconds: float = 0.0
    message: str = ""
    report: dict[str, Any] = field(default_factory=dict)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `optimize-many` and its options."""
    p = sub.add_parser(
        "optimize-many",
        help="optimize a fleet of models listed in a TOML manifest, in parallel",
        description="One task per model on the chosen executor (local processes or a Ray cluster);\n"
        "prints a summary table; exit 1 if any model failed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    add_optimize_many_arguments(p)
    p.set_defaults(func=run_optimize_many)


def add_optimize_many_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `onnxopt optimize-many`."""
    parser.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="TOML file listing models, pipelines, calibration sets and outputs (see the module docs / README)",
    )
    parser.add_argument("--report", metavar="R.json", help="write every model's report as one JSON file")
    add_logging_options(parser, quiet_help="print only the failures")
    add_executor_arguments(parser)


def optimize_one(job: ModelJob) -> JobResult:
    """Optimize one model and write its output (runs on a worker); failures come back as a result."""
    t0 = time.perf_counter()
    try:
        row = _optimize_and_save(job)
    except GateFailed as exc:
        where = save_reproducer(["optimize", job.input, "-o", job.output, "-p", job.pipeline], exc)
        row = JobResult(job.name, "rejected", message=f"{exc}; nothing written (reproducer in {where})")
    except UserError as exc:
        row = JobResult(job.name, "error", message=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001  one model's failure is a row, not the end of the fleet
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        row = JobResult(job.name, "error", message=last[:300])
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _optimize_and_save(job: ModelJob) -> JobResult:
    """Optimize one model; save it unless its --check failed (then the row says why)."""
    result = optimize(
        job.input,
        pipeline=job.pipeline,
        calibration=job.calibration,
        check=job.check,
        input_shapes=job.input_shapes,
        target=job.target,
    )
    before, after = result.report["before"], result.report["after"]
    row = JobResult(
        job.name, "ok", nodes=(before["nodes"], after["nodes"]), parameters=(before["parameters"], after["parameters"])
    )
    check = result.report.get("check")
    if check is not None and not check["ok"]:
        row.status, row.message = "check failed", str(check.get("message", ""))
    else:
        result.protected = result.protected | {Path(f) for f in job.protected}
        result.save(job.output)
        row.output = job.output
    row.report = result.report
    return row


def optimize_many(jobs: list[ModelJob], executor: Executor) -> list[JobResult]:
    """Run every job through `executor` (one task per model), results in manifest order."""
    return executor.map(optimize_one, jobs, desc="optimize-many", unit="model")


def summary(results: list[JobResult]) -> str:
    """The fleet's summary table."""
    rows = []
    for r in results:
        nodes = f"{r.nodes[0]} -> {r.nodes[1]}" if r.nodes else "-"
        params = f"{human_count(r.parameters[0])} -> {human_count(r.parameters[1])}" if r.parameters else "-"
        rows.append([r.name, r.status, nodes, params, f"{r.seconds:.1f}", r.output or r.message])
    failed = sum(r.status != "ok" for r in results)
    return (
        table(["model", "status", "nodes", "parameters", "seconds", "output / error"], rows)
        + f"\n\n{len(results) - failed}/{len(results)} models ok"
    )


def _check_report_path(report: str, jobs: list[ModelJob]) -> None:
    """--report may overwrite no model input, output or data file of the fleet."""
    taken = (
        {Path(f) for f in jobs[0].protected}
        | {Path(j.output).resolve() for j in jobs}
        | {data_file_of(j.output) for j in jobs}
    )
    check_output_path(report, protected=frozenset(taken))


def run_optimize_many(args: argparse.Namespace) -> int:
    """Run the command: 0 if every model was optimized, 1 if any failed, 2 for a bad manifest, 3 if the
    save gate refused a result (a bug of ours: the summary names the reproducer)."""
    jobs = load_manifest(args.manifest)
    if args.report:
        _check_report_path(args.report, jobs)
    with executor_from_args(args) as executor:
        results = optimize_many(jobs, executor)
    if args.report:
        write_json({"executor": args.executor, "models": [vars(r) for r in results]}, args.report)
    failed = [r for r in results if r.status != "ok"]
    if not args.quiet:
        print(summary(results))
    for r in failed:
        print(f"onnxopt: {r.name}: {r.status}: {r.message}", file=sys.stderr)
    if any(r.status == "rejected" for r in failed):
        return EXIT_INTERNAL
    return EXIT_CHECK if failed else EXIT_OK
