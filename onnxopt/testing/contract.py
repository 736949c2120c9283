"""The pass contract: what every registered pass must keep, as one call a plugin's tests can make.

`check_pass_contract(pass, model)` runs the pass and checks that its output passes
`onnx.checker` (full) and loads in onnxruntime, that two runs give the same bytes,
that `changed` matches a graph hash taken before and after (and that a pass that
changed nothing says why), that a second run on its own output changes nothing when
the pass declares itself idempotent, and, when asked, that the outputs still match
the original within the pass's tolerance class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

from onnxopt.data.samples import CalibrationData, Sample
from onnxopt.framework.context import PassContext
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import get_pass
from onnxopt.ir.graph import cleanup, export_model, graph_hash, import_model
from onnxopt.runtime.sessions import make_session
from onnxopt.verify.check import check_models


class ContractViolation(AssertionError):
    """A pass broke its contract; the message names the pass and the broken rule."""


@dataclass
class ContractReport:
    """What the contract run saw: the pass's output model and the result of its first run."""

    model: onnx.ModelProto
    result: PassResult


def _configured(pass_: str | type[Pass] | Pass, options: Mapping[str, str] | Any | None) -> Pass:
    """A pass instance from a registered name, a class or an instance, with `options` given as
    pipeline-text values (`{"ratio": "0.3"}`) or as the pass's `Options` dataclass."""
    if isinstance(pass_, Pass):
        return pass_
    cls = get_pass(pass_) if isinstance(pass_, str) else pass_
    if options is None or not isinstance(options, Mapping):
        return cls(options)
    return cls(cls.parse_options(dict(options)))


def apply_pass(
    pass_: str | type[Pass] | Pass,
    model: onnx.ModelProto,
    *,
    options: Mapping[str, str] | Any | None = None,
    calibration: Iterable[Sample] | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass on a copy of `model` as the pass manager would (then clean up dead nodes) and
    return the new model and the pass's result. Checks that `changed` is honest."""
    p = _configured(pass_, options)
    graph = import_model(model)
    before = graph_hash(graph)
    calib = CalibrationData(list(calibration), model) if calibration is not None else None
    result = p.run(graph, PassContext(calib, settings))
    if not isinstance(result, PassResult):
        raise ContractViolation(f"{p.name}: run() returned {type(result).__name__}, expected PassResult")
    cleanup(graph)
    changed = graph_hash(graph) != before
    if result.changed != changed:
        raise ContractViolation(f"{p.name}: changed={result.changed} but the graph hash says {changed}")
    if not result.changed and not result.reason.strip():
        raise ContractViolation(f"{p.name} changed nothing and gave no reason")
    return export_model(graph), result


def _serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def _check_valid(name: str, model: onnx.ModelProto) -> None:
    """The output passes the full checker and loads in onnxruntime."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ContractViolation(f"{name}: output fails onnx.checker: {exc}") from exc
    make_session(model)


def _check_outputs(
    name: str,
    tolerance: str,
    original: onnx.ModelProto,
    out: onnx.ModelProto,
    samples: list[Sample] | None,
    settings: dict[str, Any],
) -> None:
    """The output computes what the original does within the pass's tolerance class."""
    verdict = check_models(original, out, 3, tolerance, samples, settings.get("input_shapes"))
    if not verdict.ok:
        raise ContractViolation(f"{name}: outputs differ from the original ({tolerance}): {verdict.message}")


def check_pass_contract(
    pass_: str | type[Pass] | Pass,
    model: onnx.ModelProto,
    *,
    options: Mapping[str, str] | Any | None = None,
    calibration: Iterable[Sample] | None = None,
    settings: dict[str, Any] | None = None,
    idempotent: bool | None = None,
    check_outputs: bool = True,
) -> ContractReport:
    """Hold a pass (registered name, class or instance) to the contract on `model`; raise
    `ContractViolation` naming the broken rule, else return the output and the first result.

    `calibration`: samples ({input name: array}) for passes that need data, also used to compare
    outputs; `settings`: the context's settings (e.g. `{"input_shapes": {...}}`); `idempotent`:
    whether a second run must change nothing (default: the pass's `idempotent` attribute);
    `check_outputs`: compare outputs with the original within the pass's `tolerance`.
    """
    p = _configured(pass_, options)
    samples = list(calibration) if calibration is not None else None
    settings = dict(settings or {})
    out, result = apply_pass(p, model, calibration=samples, settings=settings)
    _check_valid(p.name, out)
    again, _ = apply_pass(p, model, calibration=samples, settings=settings)
    if _serialized(out) != _serialized(again):
        raise ContractViolation(f"{p.name} is not deterministic: two runs gave different bytes")
    if check_outputs:
        _check_outputs(p.name, p.tolerance, model, out, samples, settings)
    if idempotent if idempotent is not None else p.idempotent:
        _, second = apply_pass(p, out, calibration=samples, settings=settings)
        if second.changed:
            raise ContractViolation(f"{p.name} changed its own output again (not idempotent)")
    return ContractReport(out, result)
