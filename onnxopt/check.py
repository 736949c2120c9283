"""`--check N`: run the original and the result on the CPU EP with N seeded inputs and compare.

Tolerances follow what the pipeline was allowed to change: exact passes must
match to float rounding; quantization is judged by SQNR; approximate passes
(prune, lowrank) by cosine similarity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.data import Sample, seeded_inputs
from onnxopt.errors import UserError
from onnxopt.kernels.metrics import compare
from onnxopt.runtime import make_session, run

#: Tolerance per tolerance class, ordered loosest last.
TOLERANCES = {
    "exact": {"rtol": 1e-4, "atol": 1e-5},
    "approximate": {"min_cosine": 0.98},
    "quantize": {"min_sqnr_db": 10.0},
}
_ORDER = ["exact", "approximate", "quantize"]


def loosest(classes: list[str]) -> str:
    """The loosest tolerance class among the passes of a pipeline."""
    return max(classes, key=_ORDER.index) if classes else "exact"


@dataclass
class CheckResult:
    """Outcome of comparing two models on seeded inputs."""

    ok: bool
    tolerance: str
    samples: int
    worst: dict[str, dict]
    message: str

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance, "samples": self.samples, "worst": self.worst,
                "message": self.message}


def _violation(tol: str, ref: np.ndarray, cand: np.ndarray, m: dict) -> str | None:
    t = TOLERANCES[tol]
    if ref.shape != cand.shape:
        return f"shape {list(cand.shape)} != {list(ref.shape)}"
    if m.get("cand_nan", 0) > m.get("ref_nan", 0) or m.get("cand_inf", 0) > m.get("ref_inf", 0):
        return "NaN or Inf values that the original does not produce"
    if tol == "exact":
        if ref.dtype.kind in "f":
            bad = ~np.isclose(cand, ref, rtol=t["rtol"], atol=t["atol"], equal_nan=True)
            if bad.any():
                return (f"{int(bad.sum())} elements differ beyond rtol={t['rtol']} atol={t['atol']} "
                        f"(max abs {m['max_abs_error']:.3g})")
        elif not np.array_equal(ref, cand):
            return "integer outputs differ"
        return None
    if tol == "approximate" and m["cosine"] < t["min_cosine"]:
        return f"cosine {m['cosine']:.4f} < {t['min_cosine']}"
    sqnr = _number(m["sqnr_db"])
    if tol == "quantize" and sqnr < t["min_sqnr_db"]:
        return f"SQNR {m['sqnr_db']:.1f} dB < {t['min_sqnr_db']} dB"
    return None


def _number(v) -> float:
    """A metric from `compare()` as a float ("inf"/"-inf" strings, None for NaN)."""
    return float("nan") if v is None else float(v)


def _flat_outputs(outputs: dict[str, object]) -> dict[str, np.ndarray | None]:
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
    from onnx import numpy_helper

    from onnxopt.graph import all_graph_protos

    consts = {t.name: t for t in model.graph.initializer}
    for g in all_graph_protos(model.graph):
        consts.update((node.output[0], a.t) for node in g.node if node.op_type == "Constant" and node.output
                      for a in node.attribute if a.name == "value")
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


def _input_caused(original: onnx.ModelProto, exc: Exception, feeds: dict, generated: bool,
                  fixed: frozenset[str] = frozenset()) -> UserError:
    """The error for an original model that fails on the check inputs: name the likely input and the fix.

    Inputs the user fixed (`fixed`, from --input-value) are not blamed; when no other control input is
    left, the sizes given to dynamic axes are."""
    from onnxopt.data import model_inputs

    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    msg = msg.rsplit("Status Message:", 1)[-1].rsplit(" was false. ", 1)[-1].strip()[:200]  # the failing node's words
    if not generated:
        return UserError(f"the original model itself fails on the calibration data ({msg}); "
                         "check that the data matches what the model expects")
    inputs = {k: v for k, v in model_inputs(original).items() if k not in fixed}
    controls = [k for k, (dt, dims) in inputs.items() if dt.kind in "iub" and
                all(isinstance(d, int) and d == 1 for d in dims)]
    mentioned = [k for k in inputs if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", msg)]
    dynamic = [k for k, (_, dims) in inputs.items() if any(not isinstance(d, int) or d < 0 for d in dims)]
    if dynamic and not controls and not mentioned:
        sizes = ", ".join(f"{k} {list(np.shape(feeds[k]))}" for k in dynamic if k in feeds
                          and not isinstance(feeds[k], list))
        return UserError(f"the original model itself fails on the generated check inputs ({msg}); their "
                         f"dynamic axes were given 1 (first axis) and 64 (others): {sizes}: give real inputs "
                         "with --calib, or pin the sizes the model needs with --input-shape")
    named = [k for k in mentioned if k in controls] or controls or mentioned or list(inputs)
    name = named[0]
    hint = _control_values(original, name)
    example = hint[-1] if hint else "VALUE"
    shown = np.asarray(feeds.get(name)).ravel()[:4].tolist() if not isinstance(feeds.get(name), list) else "a list"
    known = f" (the model compares it with {', '.join(map(str, hint))})" if hint else ""
    return UserError(f"the original model itself fails on the generated check inputs ({msg}); input '{name}' "
                     f"was random {shown}{known}: fix it with --input-value {name}={example}, or give real "
                     "inputs with --calib")


def check_models(original: onnx.ModelProto, result: onnx.ModelProto, n: int, tolerance: str = "exact",
                 samples: list[Sample] | None = None, input_shapes: dict | None = None, seed: int = 0,
                 values: dict[str, np.ndarray] | None = None) -> CheckResult:
    """Compare outputs of `original` and `result` on `n` seeded samples (or the given ones).

    `values` fixes inputs of the seeded samples (`--input-value`). When the original
    itself fails on the inputs, that is the inputs' fault: a `UserError` naming the
    input and the fix. Sequence outputs are compared element by element.
    """
    generated = samples is None
    samples = samples if samples is not None else seeded_inputs(original, n, seed, input_shapes, values)
    ref_s, cand_s = make_session(original), make_session(result)
    names = [o.name for o in ref_s.get_outputs()]
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing original is reported once, as a UserError, not logged by onnxruntime
    worst: dict[str, dict] = {}
    problems: list[str] = []
    for i, feeds in enumerate(samples):
        try:
            ref = _flat_outputs(dict(zip(names, ref_s.run(names, feeds, quiet))))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise _input_caused(original, exc, feeds, generated, frozenset(values or ())) from None
        cand = _flat_outputs(run(cand_s, feeds))
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
            v = _violation(tolerance, r, c, m)
            if v:
                problems.append(f"sample {i} output '{name}': {v}")
    ok = not problems
    msg = "outputs match" if ok else "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return CheckResult(ok, tolerance, len(samples), worst, msg)
