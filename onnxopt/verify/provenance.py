"""What made a model: the pipeline and its tolerance class, recorded in the model's `metadata_props`.

`resolve_tolerance` reads the record back to pick the limits `validate` judges with.

`optimize()` records them in every model it returns, so `onnxopt validate` can
judge a candidate with the limits of what its passes were allowed to change
(a quantized model by SQNR, not to float rounding) without being told.
A model optimized twice keeps the loosest class of both runs and both
pipelines: its distance from the first original is bounded by the loosest.
"""

from __future__ import annotations

import onnx

from onnxopt.verify.tolerance import TOLERANCE_NAMES, Tolerance, loosest

TOLERANCE_KEY = "onnxopt.tolerance"
PIPELINE_KEY = "onnxopt.pipeline"
TOLERANCE_CLASSES = TOLERANCE_NAMES
"""The names written under `onnxopt.tolerance`: the values of `onnxopt.verify.tolerance.Tolerance`."""


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def record_provenance(model: onnx.ModelProto, pipeline: str, tolerance: str) -> None:
    """Write `onnxopt.pipeline` and `onnxopt.tolerance` into `model.metadata_props` (in place).

    Keys already there from an earlier onnxopt run are merged: the pipelines
    joined with " ; ", the tolerance the loosest of both. Other keys are kept
    in their order.
    """
    props = _props(model)
    old_tol, old_pipe = props.get(TOLERANCE_KEY), props.get(PIPELINE_KEY)
    if old_tol in TOLERANCE_CLASSES:
        tolerance = loosest([old_tol, tolerance])
    if old_pipe:
        pipeline = f"{old_pipe} ; {pipeline}"
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in (TOLERANCE_KEY, PIPELINE_KEY)]
    del model.metadata_props[:]
    for key, value in kept + [(PIPELINE_KEY, pipeline), (TOLERANCE_KEY, tolerance)]:
        model.metadata_props.add(key=key, value=value)


def recorded_provenance(model: onnx.ModelProto) -> tuple[str | None, str | None]:
    """The (tolerance, pipeline) recorded in `model`, each None when absent.

    A tolerance value that is not a known class is returned as is; the caller
    decides what to do with it (validate warns and ignores it).
    """
    props = _props(model)
    return props.get(TOLERANCE_KEY), props.get(PIPELINE_KEY)


def resolve_tolerance(
    cand_model: onnx.ModelProto, tolerance: str | None = None, default: str | None = None
) -> tuple[str, str, list[str]]:
    """The tolerance class to judge `cand_model` with, where it came from, and warnings.

    Order: `tolerance` (given by the user), the class the candidate records
    (`onnxopt.tolerance`, written by `optimize`), `default` (the pipeline's
    class, from `optimize --validate`), else `exact`.
    """
    recorded, pipeline = recorded_provenance(cand_model)
    made_by = f", pipeline {pipeline!r}" if pipeline else ""
    warnings = []
    if recorded is not None and recorded not in TOLERANCE_NAMES:
        warnings.append(f"the candidate records an unknown {TOLERANCE_KEY}={recorded!r}; ignored")
        recorded = None
    if tolerance is not None:
        if recorded is not None and recorded != tolerance:
            warnings.append(
                f"the candidate records tolerance {recorded!r}{made_by}; judging with {tolerance!r} as asked"
            )
        return tolerance, "the tolerance argument", warnings
    if recorded is not None:
        return recorded, f"the candidate's metadata: {TOLERANCE_KEY}{made_by}", warnings
    if default is not None:
        return default, "the pipeline that made the candidate", warnings
    return Tolerance.EXACT.value, f"default: the candidate records no {TOLERANCE_KEY}", warnings
