"""The HTML report: one self-contained page from a JSON report (and optionally a diff).

No script, no stylesheet, font or image to fetch: the style is inline and the
charts are inline SVG (`onnxopt.report.charts`), so the file opens offline,
from an archive, or attached to a CI run. Tables are never cut: every stat of
every pass and every per-layer row is on the page.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from onnxopt.report import charts
from onnxopt.report.tables import human_bytes, human_count

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#c0392b}.muted{color:#666}code{font-size:12px}svg{max-width:100%;height:auto}
ul.stats{margin:0;padding-left:1.1em}details{margin:.4em 0}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (cells already HTML)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=num>{c}</td>" if isinstance(c, (int, float)) else f"<td>{c if raw else _e(c)}</td>" for c in r
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(report: dict) -> str:
    before, after = report.get("before"), report.get("after")
    if not before or not after:
        return ""
    rows = []
    for key, fmt in (("nodes", str), ("parameters", human_count), ("weight_bytes", human_bytes), ("macs", human_count)):
        b, a = before.get(key, 0), after.get(key, 0)
        rows.append([key.replace("_", " "), fmt(b), fmt(a), f"{a / b:.2f}x" if b else "-"])
    head = (
        f"<p>input <code>{_e(report.get('input'))}</code> &rarr; <code>{_e(report.get('output', '-'))}</code>, "
        f"pipeline <code>{_e(report.get('pipeline'))}</code>, target {_e(report.get('target', 'cpu'))}, "
        f"{_e(report.get('seconds', '-'))} s</p>"
    )
    return "<h2>Before and after</h2>" + head + _table(["", "before", "after", "ratio"], rows)


def _stat_cell(stats: dict) -> str:
    """Every stat of a pass, one per line; lists and dicts in full, folded."""
    items = []
    for k, v in stats.items():
        if isinstance(v, (list, dict)) and v:
            text = json.dumps(v, indent=1, default=str)
            items.append(f"<li>{_e(k)}: <details><summary>{len(v)} entries</summary><pre>{_e(text)}</pre></details>")
        else:
            items.append(f"<li>{_e(k)} = {_e(v)}</li>")
    return f"<ul class=stats>{''.join(items)}</ul>" if items else "-"


def _passes(report: dict) -> str:
    rows = []
    for r in report.get("passes", []):
        changed = (
            "<span class=ok>yes</span>" if r.get("changed") else f"<span class=bad>no</span>: {_e(r.get('reason'))}"
        )
        rows.append(
            [
                _e(r["name"]),
                f"{r.get('seconds', 0):.2f} s",
                changed,
                _e(r.get("summary", "")),
                _e(r.get("after", {}).get("nodes", "-")),
                _stat_cell(r.get("stats", {})),
                _left_alone(r.get("skipped", [])),
            ]
        )
    if not rows:
        return ""
    headers = ["pass", "time", "changed", "summary", "nodes after", "stats", "left alone"]
    return "<h2>Passes</h2>" + _table(headers, rows, raw=True)


def _left_alone(skipped: list[dict]) -> str:
    if not skipped:
        return "0"
    items = "".join(
        f"<li>{_e(s.get('node') or '?')} ({_e(s.get('op', '?'))}): {_e(s.get('reason', ''))}</li>" for s in skipped
    )
    return f"<details><summary>{len(skipped)}</summary><ul class=stats>{items}</ul></details>"


def _details_table(name: str, rows: list[dict]) -> str:
    """Every per-layer row of a pass, every key a column (nested values as JSON)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(k)) for k in keys] for r in rows]
    return f"<details><summary>{_e(name)}: {len(rows)} per-layer rows</summary>{_table(keys, cells)}</details>"


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)
    return v


def _layers(report: dict) -> str:
    parts = []
    for r in report.get("passes", []):
        rows = r.get("details") or []
        if not rows:
            continue
        drawn = [charts.quantize_chart(rows), charts.latency_chart(rows), charts.prune_chart(rows)]
        drawn.append(charts.lowrank_chart(rows))
        parts.append(f"<h2>{_e(r['name'])}: per layer</h2>" + "".join(d for d in drawn if d))
        parts.append(_details_table(r["name"], rows))
    return "".join(parts)


def _validation(report: dict) -> str:
    v = report.get("validation")
    if not v:
        return ""
    rows = []
    for e in v.get("eps", []):
        place = e.get("placement") or {}
        lat = e.get("latency") or {}
        worst = min(
            (c.get("sqnr_db") for c in e.get("checks", []) if isinstance(c.get("sqnr_db"), (int, float))), default=None
        )
        rows.append(
            [
                e.get("ep"),
                e.get("status"),
                "-" if worst is None else f"{worst:.1f} dB",
                f"{place.get('on_target', '-')} of {place.get('total', '-')} nodes" if place else "-",
                f"{lat.get('ref_ms') or '-'} -> {lat.get('cand_ms') or '-'} ms" if lat else "-",
                "; ".join(e.get("errors", []) + ([e["reason"]] if e.get("reason") else [])),
            ]
        )
    table = _table(["EP", "status", "worst SQNR", "placement", "latency (original -> optimized)", "notes"], rows)
    return f"<h2>Validation: {_e(v.get('verdict', ''))}</h2>" + charts.validation_chart(v) + table


def _diff(diff: dict | None) -> str:
    if not diff:
        return ""
    first = diff.get("first_divergence")
    verdict = (
        f"<p class=bad>first divergence: <code>{_e(first['ref'])}</code> (node {_e(first['node'])}, "
        f"{_e(first['op'])}, depth {first['depth']}): {_e('; '.join(first['violations']))}</p>"
        if first
        else "<p class=ok>no tensor diverges beyond the limits</p>"
    )
    head = (
        f"<p>{_e(diff.get('ref'))} &rarr; {_e(diff.get('cand'))} on {_e(diff.get('ep'))}, "
        f"{_e(diff.get('samples'))}; limits {_e(diff.get('limits'))}</p>"
    )
    bis = f"<p>{_e(diff['bisect']['message'])}</p>" if diff.get("bisect") else ""
    keys = ("sqnr_db", "own_sqnr_db", "cosine", "max_abs")
    tensors = diff.get("tensors", [])
    rows = [[t["depth"], t["ref"], t["node"], t["op"], *(_cell(t.get(k)) for k in keys)] for t in tensors]
    table = _table(["depth", "tensor", "node", "op", "SQNR dB", "own SQNR dB", "cosine", "max abs"], rows)
    folded = f"<details><summary>{len(rows)} tensors</summary>{table}</details>"
    return "<h2>Diff: error by depth</h2>" + head + verdict + bis + charts.diff_chart(diff) + folded


def _check(report: dict) -> str:
    check = report.get("check")
    if not check:
        return ""
    cls = "ok" if check.get("ok") else "bad"
    said = f"{_e(check.get('message'))} ({_e(check.get('samples'))} samples, {_e(check.get('tolerance'))})"
    return f"<h2>Check</h2><p class={cls}>{said}</p>"


def render_html(report: dict, diff: dict | None = None, title: str = "onnxopt report") -> str:
    """The page for an optimize report (any section may be missing) and an optional diff result."""
    if report.get("kind") == "diff" and diff is None:
        report, diff = {}, report
    body = _summary(report) + _passes(report) + _layers(report) + _validation(report) + _check(report) + _diff(diff)
    return (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_STYLE}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body or '<p>empty report</p>'}</body></html>\n"
    )


def write_html(report: dict, path: str | os.PathLike, diff: dict | None = None) -> Path:
    """Write the page atomically; return its path."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(render_html(report, diff, title=f"onnxopt report: {Path(str(report.get('input') or p.stem)).name}"))
    os.replace(tmp, p)
    return p
