"""The result of `validate`: per-EP reports, the one-word verdict derived from them, and its renderings.

Each EP ends `passed`, `failed`, `skipped` or `inconclusive`; the verdict is
derived from those and the pass check (rule in `onnxopt.verify.validate`), and
`settle` makes the EP blocks agree with it, so the two never disagree. The
report renders as a terminal table (`format_table`) and strict JSON
(`to_dict`, `write_json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.verify.comparison import OutputCheck
from onnxopt.verify.placement import Placement
from onnxopt.verify.tolerance import ThresholdSet


@dataclass
class Latency:
    """Median latency of REF and CAND on one EP after warm-up, with fixed threads."""

    ref_ms: float | None
    cand_ms: float | None
    runs: int
    threads: int

    @property
    def ratio(self) -> float | None:
        """CAND's latency over REF's (None when either is unknown)."""
        return self.cand_ms / self.ref_ms if self.ref_ms and self.cand_ms else None


@dataclass
class EpReport:
    """Everything validation found on one EP.

    status: `passed`, `failed`, `skipped` (could not run here; `reason` says
    why) or `inconclusive` (the candidate fails here, and so does the
    original; `reason` says how). `ref_checks` (REF on this EP against REF on
    the CPU EP) are computed when the candidate fails here, to tell the two apart.
    """

    ep: str
    status: str = "passed"
    reason: str = ""
    interpreter: str = ""
    ort_version: str = ""
    checks: list[OutputCheck] = field(default_factory=list)
    ref_checks: list[OutputCheck] = field(default_factory=list)
    placement: Placement | None = None
    latency: Latency | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    """The result of `validate`: the passes' own error, one `EpReport` per EP, and the verdict."""

    ref: str
    cand: str
    inputs: str
    samples: int
    thresholds: ThresholdSet
    tolerance_source: str = "default"
    pass_checks: list[OutputCheck] = field(default_factory=list)
    pass_errors: list[str] = field(default_factory=list)
    ref_errors: list[str] = field(default_factory=list)
    eps: list[EpReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    allow_missing_ep: bool = False

    @property
    def candidate_failed_pass(self) -> bool:
        """The passes' own error (CAND vs REF on the CPU EP) broke a limit, or CAND did not run there."""
        return bool(self.pass_errors) or any(c.violations for c in self.pass_checks)

    @property
    def verdict(self) -> str:
        """`passed`, `failed` or `inconclusive`; see `onnxopt.verify.validate` for the rule."""
        if self.ref_errors:
            return "inconclusive"
        if self.candidate_failed_pass or any(e.status == "failed" for e in self.eps):
            return "failed"
        judged = [e for e in self.eps if e.status == "passed"]
        if not judged or any(e.status == "inconclusive" for e in self.eps):
            return "inconclusive"
        if any(e.status == "skipped" for e in self.eps) and not self.allow_missing_ep:
            return "inconclusive"
        return "passed"

    @property
    def passed(self) -> bool:
        """True only for the verdict `passed`: an EP that did not run, or was not judged, is not a pass."""
        return self.verdict == "passed"

    def verdict_line(self) -> str:
        """`result: VERDICT` and, when it is not a plain pass, what made it so."""
        why = self._verdict_reasons()
        return f"result: {self.verdict.upper()}" + (f" ({'; '.join(why)})" if why else "")

    def _verdict_reasons(self) -> list[str]:
        """What made the verdict, one phrase per cause, in the order the verdict rule weighs them."""
        why = []
        if self.ref_errors:
            why.append("the original model fails on the CPU EP; nothing to compare the candidate with")
        if self.verdict == "failed" and self.candidate_failed_pass:
            why.append("the candidate's own error (CAND vs REF on the CPU EP) breaks the limits")
        why += [f"{e.ep}: the candidate fails here" for e in self.eps if e.status == "failed"]
        if not self.ref_errors:
            why += [f"{e.ep}: the original fails here too" for e in self.eps if e.status == "inconclusive"]
        skipped = self._skipped_reason()
        if skipped:
            why.append(skipped)
        if not self.ref_errors and not any(e.status in ("passed", "failed", "inconclusive") for e in self.eps):
            why.append("no EP was judged")
        return why

    def _skipped_reason(self) -> str:
        """The EPs that did not run here, and whether `--allow-missing-ep` accepted or would accept that."""
        skipped = [e.ep for e in self.eps if e.status == "skipped"]
        passed = self.verdict == "passed"
        if not skipped or (passed and not self.allow_missing_ep):
            return ""
        if self.allow_missing_ep and passed:
            allowed = " (allowed by --allow-missing-ep)"
        elif not self.allow_missing_ep and not self.ref_errors and any(e.status == "passed" for e in self.eps):
            allowed = "; pass --allow-missing-ep to accept that"
        else:
            allowed = ""
        return f"not run here: {', '.join(skipped)}{allowed}"

    def to_dict(self) -> dict:
        """The report as strict JSON-ready data, with `passed`, `verdict` and each EP's latency ratio."""
        d = dataclasses.asdict(self)
        d["thresholds"]["pass"] = d["thresholds"].pop("pass_")
        d["passed"] = self.passed
        d["verdict"] = self.verdict
        for e, raw in zip(self.eps, d["eps"]):
            if e.latency:
                raw["latency"]["ratio"] = e.latency.ratio
        return _json_safe(d)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON through a temporary file, so a reader never sees half of it."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    def format_table(self) -> str:
        """The human-readable report: per check and output a row of metrics, per EP placement and latency."""
        t = self.thresholds
        lines = [
            f"validate {self.ref} -> {self.cand}",
            f"inputs: {self.inputs}",
            f"tolerance {t.tolerance} (from {self.tolerance_source}): pass {t.pass_.describe()}; "
            f"backend {t.backend.describe()}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += ["", "passes (CAND vs REF, CPU EP, graph optimizations off)"]
        lines += _table(self.pass_checks) + [f"  error: {e}" for e in self.pass_errors]
        lines += [f"  the original fails here: {e}" for e in self.ref_errors]
        for e in self.eps:
            lines += ["", *_ep_lines(e)]
        lines += ["", self.verdict_line()]
        return "\n".join(lines)


def _ep_lines(e: EpReport) -> list[str]:
    """One EP's block of the table: status, checks, placement, latency, errors and notes."""
    head = f"{e.ep} [{e.status.upper()}]"
    if e.ort_version:
        head += f" onnxruntime {e.ort_version} ({e.interpreter})"
    lines = [head]
    if e.reason:
        lines.append(f"  reason: {e.reason}")
    lines += _table(e.checks)
    if e.status == "inconclusive" and e.ref_checks:
        lines += ["  the original on this EP (REF here vs REF on the CPU EP):"] + _table(e.ref_checks)
    if e.placement:
        lines.append(f"  placement: {e.placement.summary()}")
    if e.latency:
        lat = e.latency
        ratio = f"{lat.ratio:.2f}" if lat.ratio else "n/a"
        lines.append(
            f"  latency: REF {_ms(lat.ref_ms)}, CAND {_ms(lat.cand_ms)}, CAND/REF {ratio} "
            f"(median of {lat.runs} runs, {lat.threads} thread{'s' if lat.threads != 1 else ''})"
        )
    lines += [f"  error: {err}" for err in e.errors]
    lines += [f"  note: {n}" for n in e.notes]
    return lines


def settle(report: ValidationReport) -> ValidationReport:
    """Make the EP blocks agree with the verdict: when the candidate's own error (the pass check) breaks
    the limits, an EP whose own checks passed still carries that candidate, so it fails too."""
    if report.candidate_failed_pass:
        for e in report.eps:
            if e.status == "passed":
                e.status = "failed"
                e.reason = "the candidate's own error breaks the limits (pass check, CAND vs REF on the CPU EP)"
    return report


def _ms(v: float | None) -> str:
    return f"{v:.3f} ms" if v is not None else "n/a"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(checks: list[OutputCheck]) -> list[str]:
    """Rows of metrics, one per check and output, in aligned columns (empty for no checks)."""
    if not checks:
        return []
    rows = [("check", "output", "max_abs", "mean_abs", "cosine", "sqnr_db", "topk", "nan/inf", "result")]
    for c in checks:
        rows.append(
            (
                c.check,
                c.output,
                _fmt(c.max_abs, ".3g"),
                _fmt(c.mean_abs, ".3g"),
                _fmt(c.cosine, ".6f"),
                _fmt(c.sqnr_db, ".1f"),
                _fmt(c.topk, ".3f"),
                str(c.nonfinite),
                "ok" if not c.violations else "FAIL: " + "; ".join(c.violations),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]


def _json_safe(value: Any) -> Any:
    """Replace inf by "inf"/"-inf" and NaN by None so the report is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
