"""`onnxopt optimize-many MANIFEST`: optimize a fleet of models, one executor task per model.

The manifest is TOML; paths in it are relative to the manifest's directory:

    [defaults]                      # optional, applies to every [[model]]
    pipeline = "fold,fuse"
    output_dir = "optimized"        # where outputs go unless a model names its own
    check = 0

    [[model]]
    input = "models/det.onnx"
    output = "optimized/det.onnx"   # default: <output_dir>/<input stem>.opt.onnx
    pipeline = "fold,fuse,quantize{method=entropy}"
    calibration = "calib/det"       # a directory of .npz or one .npz
    input_shapes = { x = [1, 3, 640, 640] }
    check = 3

Models reach the workers by path (the manifest's filesystem must be shared
with them), and each worker writes its own output atomically. One model's
failure does not stop the others: it is a row in the summary table and makes
the exit code 1. A bad manifest is a user error (exit 2) before any work.
"""
from __future__ import annotations

import argparse
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.errors import UserError
from onnxopt.executor import Executor, add_executor_arguments, executor_from_args

MODEL_KEYS = {"input", "output", "pipeline", "calibration", "input_shapes", "check", "name"}
DEFAULT_KEYS = (MODEL_KEYS - {"input", "output", "name"}) | {"output_dir"}


@dataclass
class ModelJob:
    """One model of the manifest, with absolute paths."""

    name: str
    input: str
    output: str
    pipeline: str
    calibration: str | None = None
    input_shapes: dict[str, tuple[int, ...]] | None = None
    check: int = 0
    protected: tuple[str, ...] = ()  # every job's input files: this job's output overwrites none of them


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


def _shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not all(isinstance(v, list) and all(isinstance(d, int) and d > 0 for d in v)
                                              for v in value.values()):
        raise UserError(f"{where}: input_shapes must be a table of name = [positive ints], e.g. {{ x = [1, 3, 224, 224] }}")
    return {k: tuple(v) for k, v in value.items()}


def load_manifest(path: str | Path) -> list[ModelJob]:
    """Parse and check a manifest: every input exists, pipelines parse, outputs are distinct and writable,
    and no output (or its external data file) is any model's input or one of its data files."""
    from onnxopt.model_io import check_output_path
    from onnxopt.pipeline import DEFAULT_PIPELINE, build_pipeline

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: manifest not found (give a TOML file with [[model]] entries)")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None
    base = p.resolve().parent
    defaults = doc.get("defaults", {})
    unknown = set(doc) - {"defaults", "model"} or set(defaults) - DEFAULT_KEYS
    if unknown:
        raise UserError(f"{p}: unknown key(s) {sorted(unknown)}; a manifest has [defaults] and [[model]] entries")
    entries = doc.get("model")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{p}: no [[model]] entries")
    out_dir = base / defaults.get("output_dir", ".")
    jobs: list[ModelJob] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{p}: model {i + 1}"
        bad = set(entry) - MODEL_KEYS
        if bad:
            raise UserError(f"{where}: unknown key(s) {sorted(bad)} (allowed: {', '.join(sorted(MODEL_KEYS))})")
        if "input" not in entry:
            raise UserError(f"{where}: missing 'input' (the .onnx to optimize)")
        spec = {**{k: v for k, v in defaults.items() if k != "output_dir"}, **entry}
        src = (base / spec["input"]).resolve()
        if not src.is_file():
            raise UserError(f"{where}: input {src} not found")
        name = str(spec.get("name", src.stem))
        out = (base / spec["output"]).resolve() if "output" in spec else (out_dir / f"{src.stem}.opt.onnx").resolve()
        if not out.parent.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(out, (src,))
        if str(out) in seen:
            raise UserError(f"{where}: output {out} is also the output of '{seen[str(out)]}'")
        seen[str(out)] = name
        pipeline = str(spec.get("pipeline", DEFAULT_PIPELINE))
        try:
            build_pipeline(pipeline)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        calib = spec.get("calibration")
        if calib is not None:
            calib = str((base / calib).resolve())
            if not Path(calib).exists():
                raise UserError(f"{where}: calibration data {calib} not found")
        check = spec.get("check", 0)
        if not isinstance(check, int) or check < 0:
            raise UserError(f"{where}: check must be a non-negative integer")
        shapes = _shapes(spec["input_shapes"], where) if "input_shapes" in spec else None
        jobs.append(ModelJob(name, str(src), str(out), pipeline, calib, shapes, check))
    _check_collisions(p, jobs)
    return jobs


def _check_collisions(manifest: Path, jobs: list[ModelJob]) -> None:
    """Before any work: no job's output or data file is another job's input file (model or external
    data), output or data file. Every job then protects every input file when it saves."""
    from onnxopt.model_io import data_file_of, model_files

    inputs = [model_files(job.input) for job in jobs]
    owner: dict[Path, str] = {}
    for job, files in zip(jobs, inputs):
        for f in files:
            owner.setdefault(f, f"an input file of '{job.name}'")
    for job in jobs:
        for f, what in ((Path(job.output).resolve(), "output"), (data_file_of(job.output), "external data file")):
            if f in owner:
                raise UserError(f"{manifest}: model '{job.name}': its {what} {f} is {owner[f]}; "
                                "choose another output")
        owner[Path(job.output).resolve()] = f"the output of '{job.name}'"
        owner[data_file_of(job.output)] = f"the external data file of '{job.name}'"
    every_input = tuple(sorted({str(f) for files in inputs for f in files}))
    for job in jobs:
        job.protected = every_input


def optimize_one(job: ModelJob) -> JobResult:
    """Optimize one model and write its output (runs on a worker); failures come back as a result."""
    from onnxopt.api import optimize
    from onnxopt.model_io import GateFailed

    t0 = time.perf_counter()
    try:
        result = optimize(job.input, pipeline=job.pipeline, calibration=job.calibration, check=job.check,
                          input_shapes=job.input_shapes)
        before, after = result.report["before"], result.report["after"]
        row = JobResult(job.name, "ok", nodes=(before["nodes"], after["nodes"]),
                        parameters=(before["parameters"], after["parameters"]))
        check = result.report.get("check")
        if check is not None and not check["ok"]:
            row.status, row.message = "check failed", str(check.get("message", ""))
        else:
            result.protected = result.protected | {Path(f) for f in job.protected}
            result.save(job.output)
            row.output = job.output
        row.report = result.report
    except GateFailed as exc:
        from onnxopt.cli import save_reproducer

        where = save_reproducer(["optimize", job.input, "-o", job.output, "-p", job.pipeline], exc)
        row = JobResult(job.name, "rejected", message=f"{exc}; nothing written (reproducer in {where})")
    except UserError as exc:
        row = JobResult(job.name, "error", message=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the fleet
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        row = JobResult(job.name, "error", message=last[:300])
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def optimize_many(jobs: list[ModelJob], executor: Executor) -> list[JobResult]:
    """Run every job through `executor` (one task per model), results in manifest order."""
    return executor.map(optimize_one, jobs, desc="optimize-many", unit="model")


def summary(results: list[JobResult]) -> str:
    """The fleet's summary table."""
    from onnxopt.report import human_count, table

    rows = []
    for r in results:
        nodes = f"{r.nodes[0]} -> {r.nodes[1]}" if r.nodes else "-"
        params = f"{human_count(r.parameters[0])} -> {human_count(r.parameters[1])}" if r.parameters else "-"
        rows.append([r.name, r.status, nodes, params, f"{r.seconds:.1f}", r.output or r.message])
    failed = sum(r.status != "ok" for r in results)
    return table(["model", "status", "nodes", "parameters", "seconds", "output / error"], rows) + \
        f"\n\n{len(results) - failed}/{len(results)} models ok"


def add_optimize_many_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `onnxopt optimize-many`."""
    parser.add_argument("manifest", metavar="MANIFEST", help="TOML file listing models, pipelines, calibration sets "
                                                              "and outputs (see the module docs / README)")
    parser.add_argument("--report", metavar="R.json", help="write every model's report as one JSON file")
    parser.add_argument("--quiet", action="store_true", help="print only the failures")
    add_executor_arguments(parser)


def run_optimize_many(args: argparse.Namespace) -> int:
    """Run the command: 0 if every model was optimized, 1 if any failed, 2 for a bad manifest, 3 if the
    save gate refused a result (a bug of ours: the summary names the reproducer)."""
    jobs = load_manifest(args.manifest)
    if args.report:
        from onnxopt.model_io import check_output_path, data_file_of

        taken = {Path(f) for f in jobs[0].protected} | {Path(j.output).resolve() for j in jobs} | \
            {data_file_of(j.output) for j in jobs}
        check_output_path(args.report, protected=frozenset(taken))
    with executor_from_args(args) as executor:
        results = optimize_many(jobs, executor)
    if args.report:
        from onnxopt.report import write_json

        write_json({"executor": args.executor, "models": [vars(r) for r in results]}, args.report)
    failed = [r for r in results if r.status != "ok"]
    if not args.quiet:
        print(summary(results))
    for r in failed:
        print(f"onnxopt: {r.name}: {r.status}: {r.message}", file=sys.stderr)
    return 3 if any(r.status == "rejected" for r in failed) else 1 if failed else 0
