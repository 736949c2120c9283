"""The Python API: `optimize()` loads, runs a pipeline, reports, and optionally checks."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import onnx

from onnxopt.check import check_models, loosest
from onnxopt.data import CalibrationData, Sample
from onnxopt.manager import PassManager
from onnxopt.model_io import load_model, save_model
from onnxopt.pass_base import PassContext
from onnxopt.pipeline import DEFAULT_PIPELINE, build_pipeline
from onnxopt.stats import model_stats


@dataclass
class Result:
    """An optimized model with its report (a JSON-ready dict)."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write the model atomically (external data when asked or over 2 GB)."""
        out = save_model(self.model, path, external_data)
        self.report["output"] = str(out)
        return out


def optimize(model_or_path: onnx.ModelProto | str | os.PathLike, pipeline: str = DEFAULT_PIPELINE,
             calibration: str | os.PathLike | Iterable[Sample] | None = None, check: int = 0,
             input_shapes: dict[str, tuple[int, ...]] | None = None, dump_dir: str | os.PathLike | None = None,
             verify_each: bool = False, settings: dict[str, Any] | None = None) -> Result:
    """Optimize a model with `pipeline` (e.g. "fold,fuse,quantize{method=entropy}").

    `calibration`: a directory of .npz samples, one stacked .npz, or an iterable of
    {input_name: array}. `check`: compare with the original on that many seeded
    inputs on the CPU EP; the result's report carries the verdict.
    """
    t0 = time.perf_counter()
    source = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else None
    passes = build_pipeline(pipeline)
    if source is not None:
        original = load_model(model_or_path)
    else:
        original = onnx.ModelProto()
        original.CopyFrom(model_or_path)
    calib = CalibrationData(calibration, original) if calibration is not None else None
    for p in passes:
        if p.needs_data and calib is None:
            PassContext().require_calibration(p.name)
    ctx = PassContext(calib, {"input_shapes": input_shapes, "source_path": source, **(settings or {})})
    before = model_stats(original, input_shapes)
    pm = PassManager(passes, ctx, dump_dir=dump_dir, verify_each=verify_each)
    # `original` is ours (loaded or copied): the result is written into it, so untouched
    # weights are never held twice; the check reads the reference again
    model = pm.run_model(original, consume=True)
    del original
    after = model_stats(model, input_shapes)
    report: dict[str, Any] = {
        "input": source,
        "pipeline": pipeline,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "passes": [vars(r) for r in pm.records],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if check:
        tol = loosest([p.tolerance for p in passes])
        samples = list(calib)[:check] if calib is not None else None
        reference = load_model(source) if source is not None else model_or_path
        report["check"] = check_models(reference, model, check, tol, samples, input_shapes).to_dict()
    return Result(model, report)


