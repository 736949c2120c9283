"""Terminal reports: before/after tables, per-pass summaries, why a pass changed nothing.

The JSON form of a report is `onnxopt.report.json_report`'s."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def table(headers: list[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a else "-"


def summary_table(before: dict, after: dict) -> str:
    """Before/after table of nodes, parameters, weight bytes and MACs."""
    rows = [
        ["nodes", before["nodes"], after["nodes"], _ratio(before["nodes"], after["nodes"])],
        [
            "parameters",
            human_count(before["parameters"]),
            human_count(after["parameters"]),
            _ratio(before["parameters"], after["parameters"]),
        ],
        [
            "weight bytes",
            human_bytes(before["weight_bytes"]),
            human_bytes(after["weight_bytes"]),
            _ratio(before["weight_bytes"], after["weight_bytes"]),
        ],
        ["MACs", _macs(before), _macs(after), _ratio(before["macs"], after["macs"])],
    ]
    note = ""
    if before.get("macs_uncounted") or after.get("macs_uncounted"):
        note = (
            "\n* MACs of Conv/Gemm/MatMul nodes whose shapes cannot be inferred are not counted "
            "(shapes computed at run time; folding usually makes them known)"
        )
    return table(["", "before", "after", "ratio"], rows) + note


def _macs(stats: dict) -> str:
    n = stats.get("macs_uncounted", 0)
    return human_count(stats["macs"]) + (f" (+{n} nodes uncounted*)" if n else "")


def passes_table(records: list[dict]) -> str:
    """One row per pass: time, changed, its main statistics and how many nodes it left alone."""
    rows = []
    for r in records:
        stats = ", ".join(f"{k}={v}" for k, v in r["stats"].items() if v not in (0, None, "", [], {}))
        rows.append(
            [
                r["name"],
                f"{r['seconds']:.2f}s",
                "yes" if r["changed"] else "no (why below)",
                r.get("after", {}).get("nodes", "-"),
                stats[:90] or "-",
                len(r["skipped"]),
            ]
        )
    return table(["pass", "time", "changed", "nodes after", "stats", "left alone"], rows)


def count_reasons(rows: list[dict], key: str = "reason", limit: int = 4) -> str:
    """The most common values of `key` among `rows` with their counts, most frequent first:
    '3 x weight is not a constant; 1 x excluded' (for a pass's no-op reason)."""
    counts: dict[str, int] = {}
    for r in rows:
        why = str(r.get(key) or "").strip()
        if why:
            counts[why] = counts.get(why, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = "; ".join(f"{n} x {why}" for why, n in top[:limit])
    return text + (f"; {len(top) - limit} other reasons" if len(top) > limit else "")


def unchanged_line(record: dict) -> str:
    """The one line that says why a pass changed nothing (a no-op is never silent)."""
    return f"{record['name']}: changed nothing: {record.get('reason') or 'no reason given'}"


def format_report(report: dict) -> str:
    """The text report `optimize` prints."""
    parts = [f"target: {report.get('target', 'cpu')}", summary_table(report["before"], report["after"]), ""]
    parts.append(passes_table(report["passes"]))
    unchanged = [unchanged_line(r) for r in report["passes"] if not r["changed"]]
    if unchanged:
        parts += [""] + unchanged
    parts += _already_int8_lines(report["passes"]) + _left_alone_lines(report["passes"])
    if "check" in report:
        c = report["check"]
        parts.append("")
        parts.append(
            f"check ({c['samples']} samples, {c['tolerance']} tolerance): {'OK' if c['ok'] else 'FAILED'}"
            f" - {c['message']}"
        )
    return "\n".join(parts)


def _already_int8_lines(records: list[dict]) -> list[str]:
    """The layers a pass found already quantized (first 10), with a blank line before; none: []."""
    already = [(r["name"], d) for r in records for d in r.get("details", []) if d.get("already_int8")]
    if not already:
        return []
    lines = ["", f"already int8 ({len(already)}), left as they are:"]
    lines += [f"  [{name}] {d['node']} ({d.get('op', '?')})" for name, d in already[:10]]
    if len(already) > 10:
        lines.append(f"  ... {len(already) - 10} more in the JSON report")
    return lines


def _left_alone_lines(records: list[dict]) -> list[str]:
    """The nodes passes left alone and why (first 10), with a blank line before; none: []."""
    skipped = [(r["name"], s) for r in records for s in r["skipped"]]
    if not skipped:
        return []
    lines = ["", f"left alone ({len(skipped)}):"]
    for name, s in skipped[:10]:
        lines.append(f"  [{name}] {s.get('node') or '?'} ({s.get('op', '?')}): {s.get('reason', '')}")
    if len(skipped) > 10:
        lines.append(f"  ... {len(skipped) - 10} more in the JSON report")
    return lines
