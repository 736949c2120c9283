"""`--check N`: run the original and the result on the CPU EP with N seeded inputs and compare.

Tolerances follow what the pipeline was allowed to change (its loosest class,
`onnxopt.verify.tolerance`): each output's worst case over the samples is
judged with the class's pass limits by the same rule as `onnxopt validate`'s
pass check (`onnxopt.verify.comparison`), so both give the same verdict.
Sequence outputs are compared element by element.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxopt.data.samples import Sample, model_inputs, seeded_inputs
from onnxopt.errors import UserError
from onnxopt.ir.graph import all_graph_protos
from onnxopt.kernels.metrics import compare
from onnxopt.runtime.sessions import ORT_ERRORS, make_session, run
from onnxopt.verify.comparison import SampleMetrics, class_score_outputs, merge_sample_metrics, output_metrics
from onnxopt.verify.tolerance import Tolerance


@dataclass
class CheckResult:
    """Outcome of comparing two models on seeded inputs."""

    ok: bool
    tolerance: str
    samples: int
    worst: dict[str, dict]
    message: str

    def to_dict(self) -> dict:
        """The result as the `check` entry of the optimize report."""
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "samples": self.samples,
            "worst": self.worst,
            "message": self.message,
        }


def _number(v) -> float:
    """A metric from `compare()` as a float ("inf"/"-inf" strings, None for NaN)."""
    return float("nan") if v is None else float(v)


def _flat_outputs(outputs: Mapping[str, object]) -> dict[str, np.ndarray | None]:
    """Outputs by name with sequences spread into `name[i]` entries (compared one by one)."""
    flat: dict[str, np.ndarray | None] = {}
    for name, v in outputs.items():
        if isinstance(v, list):
            flat[f"{name}#len"] = np.array(len(v))
            flat.update({f"{name}[{i}]": np.asarray(x) for i, x in enumerate(v)})
        else:
            flat[name] = None if v is None else np.asarray(v)
    return flat


def _control_values(model: onnx.ModelProto, name: str) -> list:
    """Constants the graph compares input `name` with (`Equal(name, c)`, in any subgraph): the values a
    control input such as a sample rate is meant to take."""
    consts = {t.name: t for t in model.graph.initializer}
    for g in all_graph_protos(model.graph):
        consts.update(
            (node.output[0], a.t)
            for node in g.node
            if node.op_type == "Constant" and node.output
            for a in node.attribute
            if a.name == "value"
        )
    found: list = []
    for g in all_graph_protos(model.graph):
        for node in g.node:
            if node.op_type == "Equal" and name in node.input:
                other = [i for i in node.input if i != name]
                if other and other[0] in consts:
                    v = numpy_helper.to_array(consts[other[0]])
                    if v.size == 1 and v.item() not in found:
                        found.append(v.item())
    return sorted(found)


def _failing_words(exc: Exception) -> str:
    """The failing node's own words from an onnxruntime error (its first line, without the status preamble)."""
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return msg.rsplit("Status Message:", 1)[-1].rsplit(" was false. ", 1)[-1].strip()[:200]


def _is_dynamic(dims: list) -> bool:
    """Some axis has no fixed size (symbolic, unknown or negative)."""
    return any(not isinstance(d, int) or d < 0 for d in dims)


def _input_caused(
    original: onnx.ModelProto, exc: Exception, feeds: dict, generated: bool, fixed: frozenset[str] = frozenset()
) -> UserError:
    """The error for an original model that fails on the check inputs: name the likely input and the fix.

    Inputs the user fixed (`fixed`, from --input-value) are not blamed; when no other control input is
    left, the sizes given to dynamic axes are."""
    msg = _failing_words(exc)
    if not generated:
        return UserError(
            f"the original model itself fails on the calibration data ({msg}); "
            "check that the data matches what the model expects"
        )
    inputs = {k: v for k, v in model_inputs(original).items() if k not in fixed}
    controls, mentioned, dynamic = _suspects(inputs, msg)
    if dynamic and not controls and not mentioned:
        return _dynamic_axes_error(msg, dynamic, feeds)
    named = [k for k in mentioned if k in controls] or controls or mentioned or list(inputs)
    return _control_input_error(original, msg, named[0], feeds)


def _suspects(inputs: dict, msg: str) -> tuple[list[str], list[str], list[str]]:
    """Inputs that may have made the original fail: control inputs (integer or bool of size 1), inputs
    the error message names, and inputs with dynamic axes."""
    controls = [k for k, (dt, dims) in inputs.items() if dt.kind in "iub" and all(_is_one(d) for d in dims)]
    mentioned = [k for k in inputs if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", msg)]
    dynamic = [k for k, (_, dims) in inputs.items() if _is_dynamic(dims)]
    return controls, mentioned, dynamic


def _is_one(dim: object) -> bool:
    return isinstance(dim, int) and dim == 1


def _dynamic_axes_error(msg: str, dynamic: list[str], feeds: dict) -> UserError:
    """Blame the sizes the generated inputs gave to dynamic axes."""
    sizes = ", ".join(
        f"{k} {list(np.shape(feeds[k]))}" for k in dynamic if k in feeds and not isinstance(feeds[k], list)
    )
    return UserError(
        f"the original model itself fails on the generated check inputs ({msg}); their "
        f"dynamic axes were given 1 (first axis) and 64 (others): {sizes}: give real inputs "
        "with --calib, or pin the sizes the model needs with --input-shape"
    )


def _control_input_error(original: onnx.ModelProto, msg: str, name: str, feeds: dict) -> UserError:
    """Blame input `name`: show its random value and the values the model compares it with."""
    hint = _control_values(original, name)
    example = hint[-1] if hint else "VALUE"
    shown = np.asarray(feeds.get(name)).ravel()[:4].tolist() if not isinstance(feeds.get(name), list) else "a list"
    known = f" (the model compares it with {', '.join(map(str, hint))})" if hint else ""
    return UserError(
        f"the original model itself fails on the generated check inputs ({msg}); input '{name}' "
        f"was random {shown}{known}: fix it with --input-value {name}={example}, or give real "
        "inputs with --calib"
    )


def check_models(
    original: onnx.ModelProto,
    result: onnx.ModelProto,
    n: int,
    tolerance: str = "exact",
    samples: list[Sample] | None = None,
    input_shapes: dict | None = None,
    seed: int = 0,
    values: dict[str, np.ndarray] | None = None,
) -> CheckResult:
    """Compare outputs of `original` and `result` on `n` seeded samples (or the given ones).

    `values` fixes inputs of the seeded samples (`--input-value`). When the original
    itself fails on the inputs, that is the inputs' fault: a `UserError` naming the
    input and the fix. Sequence outputs are compared element by element.
    """
    limits = Tolerance.named(tolerance).pass_
    generated = samples is None
    samples = samples if samples is not None else seeded_inputs(original, n, seed, input_shapes, values)
    ref_s, cand_s = make_session(original), make_session(result)
    names = [o.name for o in ref_s.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing original is reported once, as a UserError, not logged by onnxruntime
    worst: dict[str, dict] = {}
    problems: list[str] = []
    per_sample: list[dict[str, SampleMetrics]] = []
    for i, feeds in enumerate(samples):
        try:
            ref = _flat_outputs(dict(zip(names, ref_s.run(names, feeds, quiet))))
        except ORT_ERRORS as exc:
            raise _input_caused(original, exc, feeds, generated, frozenset(values or ())) from None
        cand = _flat_outputs(run(cand_s, feeds))
        per_sample.append(_sample_rows(i, ref, cand, limits.topk, worst, problems))
    checks = merge_sample_metrics("check", per_sample, limits)
    problems += [f"output '{c.output}': {'; '.join(c.violations)}" for c in checks if c.violations]
    ok = not problems
    msg = (
        "outputs match"
        if ok
        else "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    )
    return CheckResult(ok, tolerance, len(samples), worst, msg)


def _sample_rows(
    i: int,
    ref: dict[str, np.ndarray | None],
    cand: dict[str, np.ndarray | None],
    topk: int,
    worst: dict[str, dict],
    problems: list[str],
) -> dict[str, SampleMetrics]:
    """The metrics of sample `i`'s outputs present in both models; keeps each output's worst `compare()`.

    Outputs missing from the result, or optional values present in only one
    model, go to `problems` instead.
    """
    present = {k: v for k, v in ref.items() if v is not None}
    scores = class_score_outputs(present)
    rows: dict[str, SampleMetrics] = {}
    for name, r in ref.items():
        if name not in cand:
            problems.append(f"output '{name}' missing")
            continue
        c = cand[name]
        if r is None or c is None:
            if (r is None) != (c is None):
                problems.append(f"sample {i} output '{name}': optional value present in only one model")
            continue
        m = compare(r, c) if r.shape == c.shape else {"max_abs_error": "inf", "cosine": 0.0, "sqnr_db": "-inf"}
        w = worst.get(name)
        if w is None or _number(m["max_abs_error"]) > _number(w["max_abs_error"]):
            worst[name] = m
        rows[name] = output_metrics(name, r, c, topk, scores)
    return rows
