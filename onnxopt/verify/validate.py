"""`onnxopt validate REF CAND`: compare an optimized model with its original on execution providers.

Three kinds of run, each in a worker process (`onnxopt.ep`):

- REF on the CPU EP: the reference outputs (and REF's CPU latency);
- CAND on the CPU EP with graph optimizations off: `pass` check, the error the
  optimizer's passes made;
- CAND on each target EP: `backend` check (against CAND on the CPU EP without
  optimizations, i.e. the backend's own error) and `e2e` check (against REF,
  what a deployment sees), plus node placement and CAND/REF latency.

Thresholds follow the tolerance class of what the passes were allowed to change
(`exact`, `approximate`, `quantize`: `onnxopt.verify.tolerance`, the same limits as `optimize --check`), taken from, in
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

Modules: `comparison` (per-output metrics and judgement), `placement`,
`validation_report` (the report and its verdict), `validation_runs` (the worker
runs shared by) `validate_local` and `validate_sharded`, and `validate_cli`
(the command's options). This module checks the inputs and picks the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnxopt.data.pinning import check_pinnable
from onnxopt.data.samples import CalibrationData, Sample, model_inputs, seeded_inputs
from onnxopt.errors import UserError
from onnxopt.ir.model_io import load_model, save_model
from onnxopt.report.progress import progress
from onnxopt.runtime.executor import Executor
from onnxopt.verify.ep import provider_name
from onnxopt.verify.ep.envs import EpInterpreter, resolve_interpreter
from onnxopt.verify.ep.runner import write_inputs
from onnxopt.verify.provenance import resolve_tolerance
from onnxopt.verify.tolerance import ThresholdSet
from onnxopt.verify.validate_local import validate_local
from onnxopt.verify.validate_sharded import validate_sharded
from onnxopt.verify.validation_report import ValidationReport, settle
from onnxopt.verify.validation_runs import WorkerRuns


def validate(
    ref: str | os.PathLike | onnx.ModelProto,
    cand: str | os.PathLike | onnx.ModelProto,
    eps: tuple[str, ...] | list[str] = ("cpu",),
    data=None,
    samples: int = 8,
    thresholds: ThresholdSet | None = None,
    require_no_fallback: bool = False,
    seed: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    threads: int = 1,
    warmup: int = 3,
    runs: int = 10,
    timeout: float = 600.0,
    ep_python: dict[str, str] | None = None,
    executor: Executor | None = None,
    tolerance: str | None = None,
    limits: dict[str, float | int | None] | None = None,
    default_tolerance: str | None = None,
    topk_outputs: list[str] | None = None,
    allow_missing_ep: bool = False,
) -> ValidationReport:
    """Validate CAND against REF on the given EPs; see the module docstring for what runs where.

    `data` is a calibration-format path or iterable of samples (else `samples`
    seeded random inputs). `ep_python` names an interpreter per EP. With an
    `executor`, the accuracy runs go to its workers in shards of samples and
    only placement and latency run here (`validate_sharded`); without one,
    everything runs from this process (`validate_local`).

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
        names = _check_models(ref_path, ref_model, cand_path, cand_model, topk_outputs)
        if thresholds is None:
            tol, tol_source, tol_warnings = resolve_tolerance(cand_model, tolerance, default_tolerance)
            thresholds = ThresholdSet.for_tolerance(tol, **(limits or {}))
        else:
            tol_source, tol_warnings = "the thresholds argument", []
        feeds, source, warnings = _inputs(ref_model, data, samples, seed, input_shapes)
        if not feeds:
            raise UserError(f"no samples to compare in {data}" if data is not None else "--samples must be >= 1")
        write_inputs(tmpdir / "inputs.npz", feeds, names)
        report = ValidationReport(
            _label(ref, ref_path, "<ref model>"),
            _label(cand, cand_path, "<cand model>"),
            source,
            len(feeds),
            thresholds,
            tol_source,
            warnings=tol_warnings + warnings,
            allow_missing_ep=allow_missing_ep,
        )
        run = WorkerRuns(tmpdir / "inputs.npz", names, len(feeds), threads, warmup, runs, timeout)
        cpu, interps = _interpreters(eps, ep_python or {})
        if executor is not None:
            ref_side, cand_side = (ref_path, ref_model), (cand_path, cand_model)
            validate_sharded(
                executor,
                report,
                feeds,
                ref_side,
                cand_side,
                cpu,
                interps,
                run,
                tmpdir,
                require_no_fallback,
                topk_outputs,
            )
        else:
            validate_local(
                report, ref_path, cand_path, cand_model, cpu, interps, run, require_no_fallback, topk_outputs
            )
        return settle(report)


def _label(given: str | os.PathLike | onnx.ModelProto, path: Path, in_memory: str) -> str:
    """How the report names a model: its path, or `in_memory` for a model given as a ModelProto."""
    return in_memory if isinstance(given, onnx.ModelProto) else str(path)


def _check_models(
    ref_path: Path,
    ref_model: onnx.ModelProto,
    cand_path: Path,
    cand_model: onnx.ModelProto,
    topk_outputs: list[str] | None,
) -> list[str]:
    """REF's input names, after checking that CAND has the same inputs and `topk_outputs` are REF's outputs."""
    names = list(model_inputs(ref_model))
    if set(model_inputs(cand_model)) != set(names):
        raise UserError(
            f"{cand_path}: inputs {sorted(model_inputs(cand_model))} differ from "
            f"{ref_path}'s {sorted(names)}; validate needs the same input names"
        )
    if topk_outputs is not None:
        outputs = [o.name for o in ref_model.graph.output]
        unknown = [n for n in topk_outputs if n not in outputs]
        if unknown:
            raise UserError(
                f"--topk-outputs: {', '.join(unknown)} not an output of {ref_path} (outputs: {', '.join(outputs)})"
            )
    return names


def _interpreters(eps: list[str], ep_python: dict[str, str]) -> tuple[EpInterpreter, list[EpInterpreter]]:
    """The CPU EP's interpreter (which must run) and one interpreter per EP asked for."""
    cpu = resolve_interpreter("cpu", ep_python.get("cpu"))
    if not cpu.available:
        raise UserError(f"the CPU EP cannot run: {cpu.reason}")
    return cpu, [cpu if ep == "cpu" else resolve_interpreter(ep, ep_python.get(ep)) for ep in eps]


def _model_file(model: str | os.PathLike | onnx.ModelProto, spill: Path) -> tuple[Path, onnx.ModelProto]:
    """A path the workers can open, and the model (loaded without external weights) for its inputs."""
    if isinstance(model, onnx.ModelProto):
        save_model(model, spill)
        return spill, model
    path = Path(model)
    return path, load_model(path, load_external=False)


def _inputs(
    model: onnx.ModelProto, data, samples: int, seed: int, input_shapes: dict | None
) -> tuple[list[Sample], str, list[str]]:
    """The samples to run: from calibration data, or seeded random ones with a warning."""
    if input_shapes:
        check_pinnable(model, input_shapes)  # unknown names and wrong ranks are errors, never ignored
    if data is not None:
        source = CalibrationData(data, model, limit=samples)
        feeds = list(progress(source, desc="loading samples", total=len(source), unit="sample"))
        where = str(data) if isinstance(data, (str, os.PathLike)) else "given samples"
        return feeds, f"{len(feeds)} samples from {where}", []
    feeds = seeded_inputs(model, samples, seed, input_shapes)
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds[0].items()) if feeds else ""
    return (
        feeds,
        f"{len(feeds)} seeded random samples (seed {seed}): {shapes}",
        ["random inputs are weak evidence of accuracy; pass --data with real samples"],
    )


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
