"""The Python API: `optimize()` loads, runs a pipeline, reports, and optionally checks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.analysis.stats import model_stats
from onnxopt.data.pinning import pin_input_shapes
from onnxopt.data.samples import CalibrationData, Sample
from onnxopt.framework.context import PassContext, check_target
from onnxopt.framework.manager import PassManager
from onnxopt.framework.pass_api import Pass
from onnxopt.framework.pipeline import DEFAULT_PIPELINE, build_pipeline
from onnxopt.ir.model_io import check_output_path, load_model, model_files, save_model
from onnxopt.verify.check import check_models
from onnxopt.verify.gate import Reference, gate, signature
from onnxopt.verify.provenance import record_provenance
from onnxopt.verify.tolerance import loosest


@dataclass
class Result:
    """An optimized model with its report (a JSON-ready dict).

    `reference` is what the save gate compares the model with (the original's
    signature and pinned shapes); `protected` the input's files, never overwritten.
    """

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    reference: Reference | None = None
    protected: frozenset[Path] = frozenset()

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Check the model with the save gate (`onnxopt.verify.gate.gate`: checker, whole signature,
        onnxruntime load), then write it atomically (external data when asked or over 2 GB).

        Raises `GateFailed` (nothing written) when the model fails the gate.
        """
        check_output_path(path, protected=self.protected)
        gate(self.model, self.reference)
        out = save_model(self.model, path, external_data, protected=self.protected)
        self.report["output"] = str(out)
        return out


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    pipeline: str = DEFAULT_PIPELINE,
    calibration: str | os.PathLike | Iterable[Sample] | None = None,
    check: int = 0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    dump_dir: str | os.PathLike | None = None,
    verify_each: bool = False,
    settings: dict[str, Any] | None = None,
    input_values: dict[str, np.ndarray] | None = None,
    target: str = "cpu",
) -> Result:
    """Optimize a model with `pipeline` (e.g. "fold,fuse,quantize{method=entropy}").

    `calibration`: a directory of .npz samples, one stacked .npz, or an iterable of
    {input_name: array}. `check`: compare with the original on that many seeded
    inputs on the CPU EP; the result's report carries the verdict. `input_values`
    fixes inputs of the seeded check data (control inputs such as a sample rate).
    `target`: the runtime the model is for (`TARGETS`): fusions into runtime-specific operators
    and quantization choices follow it (passes read `ctx.settings["target"]`).
    """
    target = check_target(target)
    t0 = time.perf_counter()
    source = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else None
    passes = build_pipeline(pipeline)
    original = _own_copy(model_or_path, source)
    read_original = _reader(model_or_path)
    reference = Reference(signature(original), pinned=input_shapes, load=read_original)
    protected = frozenset(model_files(source)) if source is not None else frozenset()
    pinned = pin_input_shapes(original, input_shapes)  # --input-shape rewrites the inputs (onnxopt.data.pinning)
    calib = CalibrationData(calibration, original) if calibration is not None else None
    _require_data(passes, calib)
    ctx = PassContext(
        calib, {"input_shapes": input_shapes, "source_path": source, "target": target, **(settings or {})}
    )
    before = model_stats(original, input_shapes)
    pm = PassManager(passes, ctx, dump_dir=dump_dir, verify_each=verify_each)
    # `original` is ours (loaded or copied): the result is written into it, so untouched
    # weights are never held twice; the check reads the reference again
    model = pm.run_model(original, consume=True)
    pinned.update_outputs(model)  # outputs the passes made static take their pinned dims
    record_provenance(model, pipeline, loosest([p.tolerance for p in passes]))  # read by `validate`
    del original
    after = model_stats(model, input_shapes)
    report: dict[str, Any] = {
        "input": source,
        "pipeline": pipeline,
        "target": target,
        "pinned": pinned.to_dict(),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "passes": [vars(r) for r in pm.records],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if check:
        tol = loosest([p.tolerance for p in passes])
        samples = list(calib)[:check] if calib is not None else None
        original_again = read_original()
        report["check"] = check_models(
            original_again, model, check, tol, samples, input_shapes, values=input_values
        ).to_dict()
    return Result(model, report, reference, protected)


def _reader(model_or_path: onnx.ModelProto | str | os.PathLike) -> Callable[[], onnx.ModelProto]:
    """How to read the original again: load it from its file, or the caller's proto itself."""
    if isinstance(model_or_path, onnx.ModelProto):
        return lambda: model_or_path
    source = str(model_or_path)
    return lambda: load_model(source)


def _own_copy(model_or_path: onnx.ModelProto | str | os.PathLike, source: str | None) -> onnx.ModelProto:
    """The model the passes rewrite: loaded from its file, or a copy of the caller's proto (never changed)."""
    if source is not None:
        return load_model(model_or_path)
    original = onnx.ModelProto()
    original.CopyFrom(model_or_path)
    return original


def _require_data(passes: list[Pass], calib: CalibrationData | None) -> None:
    """Before any pass runs: a pass that needs calibration data and has none is a user error."""
    for p in passes:
        if p.needs_data and calib is None:
            PassContext().require_calibration(p.name)
