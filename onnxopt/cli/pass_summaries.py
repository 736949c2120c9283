"""The per-pass one-line summaries of an optimize report: each pass's `summarize(record)` if its class has
one (written where the pass's data is, e.g. `onnxopt.passes.quantize.summary`), else a generic line."""

from __future__ import annotations

from onnxopt.errors import UserError
from onnxopt.framework.registry import get_pass
from onnxopt.report.summaries import generic_summary


def add_summaries(report: dict) -> list[str]:
    """Set `summary` on every pass record of `report` (so the JSON report carries it) and return the lines."""
    lines = []
    for record in report.get("passes", []):
        try:
            summarize = getattr(get_pass(record["name"]), "summarize", None)
        except UserError:  # a pass no longer registered (a report read back later)
            summarize = None
        record["summary"] = summarize(record) if callable(summarize) else generic_summary(record)
        lines.append(record["summary"])
    return lines
