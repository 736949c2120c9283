"""`--check N`: run the original and the result on the CPU EP with N seeded inputs and compare.

Tolerances follow what the pipeline was allowed to change: exact passes must
match to float rounding; quantization is judged by SQNR; approximate passes
(prune, lowrank) by cosine similarity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.data import Sample, seeded_inputs
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


def check_models(original: onnx.ModelProto, result: onnx.ModelProto, n: int, tolerance: str = "exact",
                 samples: list[Sample] | None = None, input_shapes: dict | None = None, seed: int = 0) -> CheckResult:
    """Compare outputs of `original` and `result` on `n` seeded samples (or the given ones)."""
    samples = samples if samples is not None else seeded_inputs(original, n, seed, input_shapes)
    ref_s, cand_s = make_session(original), make_session(result)
    worst: dict[str, dict] = {}
    problems: list[str] = []
    for i, feeds in enumerate(samples):
        ref, cand = run(ref_s, feeds), run(cand_s, feeds)
        for name, r in ref.items():
            if name not in cand:
                problems.append(f"output '{name}' missing")
                continue
            c = cand[name]
            m = compare(r, c) if r.shape == c.shape else {"max_abs_error": "inf", "cosine": 0.0, "sqnr_db": "-inf"}
            w = worst.get(name)
            if w is None or _number(m["max_abs_error"]) > _number(w["max_abs_error"]):
                worst[name] = m
            v = _violation(tolerance, np.asarray(r), np.asarray(c), m)
            if v:
                problems.append(f"sample {i} output '{name}': {v}")
    ok = not problems
    msg = "outputs match" if ok else "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return CheckResult(ok, tolerance, len(samples), worst, msg)
