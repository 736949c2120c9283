"""The manifest of `onnxopt optimize-many`: a TOML list of models, checked in full before any work.

Paths in it are relative to the manifest's directory:

    [defaults]                      # optional, applies to every [[model]]
    pipeline = "fold,fuse"
    target = "cpu"                  # cpu, openvino or cuda (see optimize --target)
    output_dir = "optimized"        # where outputs go unless a model names its own
    check = 0

    [[model]]
    input = "models/det.onnx"
    output = "optimized/det.onnx"   # default: <output_dir>/<input stem>.opt.onnx
    pipeline = "fold,fuse,quantize{method=entropy}"
    calibration = "calib/det"       # a directory of .npz or one .npz
    input_shapes = { x = [1, 3, 640, 640] }
    check = 3

A bad manifest is a user error (exit 2) before any model is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from onnxopt.errors import UserError
from onnxopt.framework.context import check_target
from onnxopt.framework.pipeline import DEFAULT_PIPELINE, build_pipeline
from onnxopt.ir.model_io import check_output_path, data_file_of, model_files

MODEL_KEYS = {"input", "output", "pipeline", "target", "calibration", "input_shapes", "check", "name"}
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
    target: str = "cpu"
    protected: tuple[str, ...] = ()  # every job's input files: this job's output overwrites none of them


def load_manifest(path: str | Path) -> list[ModelJob]:
    """Parse and check a manifest: every input exists, pipelines parse, outputs are distinct and writable,
    and no output (or its external data file) is any model's input or one of its data files."""
    p = Path(path)
    doc = _read_toml(p)
    base = p.resolve().parent
    defaults = doc.get("defaults", {})
    unknown = set(doc) - {"defaults", "model"} or set(defaults) - DEFAULT_KEYS
    if unknown:
        raise UserError(f"{p}: unknown key(s) {sorted(unknown)}; a manifest has [defaults] and [[model]] entries")
    entries = doc.get("model")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{p}: no [[model]] entries")
    out_dir = base / defaults.get("output_dir", ".")
    inherited = {k: v for k, v in defaults.items() if k != "output_dir"}
    jobs: list[ModelJob] = []
    seen: dict[str, str] = {}  # output path -> the name of the job that writes it
    for i, entry in enumerate(entries):
        job = _job(f"{p}: model {i + 1}", entry, inherited, base, out_dir, seen)
        seen[job.output] = job.name
        jobs.append(job)
    _check_collisions(p, jobs)
    return jobs


def _read_toml(p: Path) -> dict[str, Any]:
    """The manifest's TOML document; a missing or unparsable file is a user error."""
    if not p.is_file():
        raise UserError(f"{p}: manifest not found (give a TOML file with [[model]] entries)")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None


def _job(
    where: str, entry: dict[str, Any], defaults: dict[str, Any], base: Path, out_dir: Path, seen: dict[str, str]
) -> ModelJob:
    """One [[model]] entry (over the defaults) as a checked job; `seen` maps outputs taken so far to their job."""
    bad = set(entry) - MODEL_KEYS
    if bad:
        raise UserError(f"{where}: unknown key(s) {sorted(bad)} (allowed: {', '.join(sorted(MODEL_KEYS))})")
    if "input" not in entry:
        raise UserError(f"{where}: missing 'input' (the .onnx to optimize)")
    spec = {**defaults, **entry}
    src = (base / spec["input"]).resolve()
    if not src.is_file():
        raise UserError(f"{where}: input {src} not found")
    name = str(spec.get("name", src.stem))
    out = _output(spec, base, out_dir, src)
    if str(out) in seen:
        raise UserError(f"{where}: output {out} is also the output of '{seen[str(out)]}'")
    pipeline = _pipeline(where, spec)
    calib = _calibration(where, spec, base)
    check = spec.get("check", 0)
    if not isinstance(check, int) or check < 0:
        raise UserError(f"{where}: check must be a non-negative integer")
    shapes = _shapes(spec["input_shapes"], where) if "input_shapes" in spec else None
    try:
        target = check_target(str(spec.get("target", "cpu")))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return ModelJob(name, str(src), str(out), pipeline, calib, shapes, check, target)


def _output(spec: dict[str, Any], base: Path, out_dir: Path, src: Path) -> Path:
    """The job's output path (its directory created), checked not to overwrite its input."""
    out = (base / spec["output"]).resolve() if "output" in spec else (out_dir / f"{src.stem}.opt.onnx").resolve()
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    check_output_path(out, (src,))
    return out


def _pipeline(where: str, spec: dict[str, Any]) -> str:
    """The job's pipeline text, parsed once so a bad pass name or option fails before any work."""
    pipeline = str(spec.get("pipeline", DEFAULT_PIPELINE))
    try:
        build_pipeline(pipeline)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return pipeline


def _calibration(where: str, spec: dict[str, Any], base: Path) -> str | None:
    """The job's calibration data as an absolute path that exists, or None."""
    calib = spec.get("calibration")
    if calib is None:
        return None
    calib = str((base / calib).resolve())
    if not Path(calib).exists():
        raise UserError(f"{where}: calibration data {calib} not found")
    return calib


def _shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    """`input_shapes = { x = [1, 3, 224, 224] }` as {name: shape}."""
    if not isinstance(value, dict) or not all(
        isinstance(v, list) and all(isinstance(d, int) and d > 0 for d in v) for v in value.values()
    ):
        raise UserError(
            f"{where}: input_shapes must be a table of name = [positive ints], e.g. {{ x = [1, 3, 224, 224] }}"
        )
    return {k: tuple(v) for k, v in value.items()}


def _check_collisions(manifest: Path, jobs: list[ModelJob]) -> None:
    """Before any work: no job's output or data file is another job's input file (model or external
    data), output or data file. Every job then protects every input file when it saves."""
    inputs = [model_files(job.input) for job in jobs]
    owner: dict[Path, str] = {}
    for job, files in zip(jobs, inputs):
        for f in files:
            owner.setdefault(f, f"an input file of '{job.name}'")
    for job in jobs:
        for f, what in ((Path(job.output).resolve(), "output"), (data_file_of(job.output), "external data file")):
            if f in owner:
                raise UserError(f"{manifest}: model '{job.name}': its {what} {f} is {owner[f]}; choose another output")
        owner[Path(job.output).resolve()] = f"the output of '{job.name}'"
        owner[data_file_of(job.output)] = f"the external data file of '{job.name}'"
    every_input = tuple(sorted({str(f) for files in inputs for f in files}))
    for job in jobs:
        job.protected = every_input
