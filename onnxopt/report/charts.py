"""Charts of a report as inline SVG text (matplotlib, Agg backend): nothing to fetch when the page opens.

Each function takes plain rows from the JSON report and returns one `<svg>`
element, or "" when there is nothing to draw. The rows are recognized by the
facts they hold, not by the pass that wrote them: a per-layer row with `int8`
and `why` is a quantization decision, one with `channels_before` a pruned
channel group, one with `rank` and `energy_kept` a factorized layer.
Text is drawn as paths (no font needed by the browser) and ids are salted
per chart, so several charts live in one page without clashes.
"""

from __future__ import annotations

import html
import io
import math
import re
from typing import Any

from onnxopt.errors import UserError

#: Colors: int8/kept/ok, float/removed/bad, neutral.
GOOD, BAD, NEUTRAL = "#2a7ab0", "#d0662b", "#777777"
_ROW_INCHES = 0.16


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("the HTML report draws its charts with matplotlib: pip install 'matplotlib>=3.7'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any, salt: str) -> str:
    """The figure as a `<figure>` holding its `<svg>` (no XML prolog, no DOCTYPE, no metadata) and its
    title as a caption (the SVG draws text as paths, which neither screen readers nor searches read)."""
    title = fig.axes[0].get_title() if fig.axes else salt
    plt = _pyplot()
    buf = io.StringIO()
    with plt.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return f"<figure class=chart id=chart-{salt}>{text}<figcaption>{html.escape(title)}</figcaption></figure>"


def _height(n: int) -> float:
    return min(max(2.2, 0.8 + _ROW_INCHES * n), 60.0)


def _finite(v: Any, default: float = math.nan) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def quantize_chart(rows: list[dict]) -> str:
    """Per layer: its SQNR measured for the decision (sensitivity, else weight storage), int8 or float."""
    rows = [r for r in rows if "int8" in r and "why" in r]
    if not rows:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    y = list(range(len(rows)))
    vals = [min(_finite(r.get("sensitivity_sqnr_db", r.get("storage_sqnr_db")), 0.0), 80.0) for r in rows]
    ax.barh(y, vals, color=[GOOD if r["int8"] else BAD for r in rows])
    ax.set_yticks(y, [f"{r['node']} ({r.get('op', '?')})" for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR of the layer's int8 form, dB (capped at 80; blue int8, orange float)")
    ax.set_title("quantize: per-layer decision")
    return _svg(fig, "quantize")


def latency_chart(rows: list[dict]) -> str:
    """Per layer: int8 latency relative to float (1.0 = float's time), from the quantize decisions."""
    rows = [r for r in rows if r.get("int8_latency_ratio") is not None]
    if not rows:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    y = list(range(len(rows)))
    ratios = [_finite(r["int8_latency_ratio"], 0.0) for r in rows]
    ax.barh(y, ratios, color=[GOOD if v < 1.0 else BAD for v in ratios])
    ax.axvline(1.0, color=NEUTRAL, linestyle="--", linewidth=1)
    ax.set_yticks(y, [r["node"] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("int8 time / float time per layer (left of the dashed line: int8 faster)")
    ax.set_title("quantize: per-layer latency, int8 vs float")
    return _svg(fig, "latency")


def prune_chart(rows: list[dict]) -> str:
    """Per channel group: the share of its channels kept and removed."""
    rows = [r for r in rows if "channels_before" in r and "channels_after" in r]
    if not rows:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    y = list(range(len(rows)))
    kept = [r["channels_after"] / max(r["channels_before"], 1) for r in rows]
    ax.barh(y, kept, color=GOOD, label="kept")
    ax.barh(y, [1 - k for k in kept], left=kept, color=BAD, label="pruned")
    ax.set_yticks(y, [f"{r['group']} ({r['channels_after']}/{r['channels_before']})" for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the group's channels")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("prune: channels per group")
    return _svg(fig, "prune")


def lowrank_chart(rows: list[dict]) -> str:
    """Per factorized layer: rank relative to the largest useful rank, and the energy kept."""
    rows = [r for r in rows if "rank" in r and "energy_kept" in r]
    if not rows:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, _height(len(rows))))
    y = list(range(len(rows)))
    share = [r["rank"] / max(r.get("max_useful_rank") or 1, 1) if r["rank"] else 1.0 for r in rows]
    ax.barh(y, share, color=[GOOD if r["rank"] else NEUTRAL for r in rows], label="rank / max useful rank")
    ax.plot([_finite(r["energy_kept"], 1.0) for r in rows], y, "o", color=BAD, markersize=3, label="energy kept")
    ax.set_yticks(y, [f"{r['node']} (rank {r['rank'] or 'dense'})" for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("lowrank: rank and energy per layer (grey: left dense)")
    return _svg(fig, "lowrank")


def validation_chart(validation: dict) -> str:
    """Per EP: the worst output SQNR of its end-to-end check, and its latency against the original."""
    eps = [e for e in validation.get("eps", []) if e.get("checks")]
    if not eps:
        return ""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 2.6))
    names = [e["ep"] for e in eps]
    sqnr = [min((_finite(c.get("sqnr_db"), 99.0) for c in e["checks"]), default=99.0) for e in eps]
    a1.bar(names, [min(v, 99.0) for v in sqnr], color=[GOOD if e["status"] == "passed" else BAD for e in eps])
    a1.set_ylabel("worst output SQNR, dB")
    a1.set_title("validation: accuracy per EP")
    ratios = [_finite((e.get("latency") or {}).get("ratio"), 0.0) for e in eps]
    a2.bar(names, ratios, color=[GOOD if 0 < r < 1 else BAD for r in ratios])
    a2.axhline(1.0, color=NEUTRAL, linestyle="--", linewidth=1)
    a2.set_ylabel("optimized / original time")
    a2.set_title("validation: latency per EP")
    return _svg(fig, "validation")


def diff_chart(diff: dict) -> str:
    """Per matched tensor by depth: its SQNR against the reference, the layer's own SQNR, and the limit."""
    rows = [t for t in diff.get("tensors", []) if t.get("sqnr_db") is not None]
    if not rows:
        return ""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    cap = 100.0
    depth = [t["depth"] for t in rows]
    ax.plot(depth, [min(_finite(t["sqnr_db"], cap), cap) for t in rows], ".-", color=GOOD, label="tensor", lw=1)
    own = [(t["depth"], min(_finite(t["own_sqnr_db"], cap), cap)) for t in rows if t.get("own_sqnr_db") is not None]
    if own:
        ax.plot(*zip(*own), "x", color=BAD, markersize=4, label="layer's own")
    limit = re.search(r"sqnr>=([\d.]+)dB", diff.get("limits", ""))
    if limit:
        ax.axhline(float(limit[1]), color=NEUTRAL, linestyle="--", linewidth=1, label="limit")
    first = diff.get("first_divergence")
    if first:
        ax.axvline(first["depth"], color=BAD, linewidth=1)
        ax.annotate(first["ref"], (first["depth"], cap * 0.9), fontsize=7, color=BAD)
    ax.set_xlabel("depth (reference's topological order)")
    ax.set_ylabel(f"SQNR dB (capped at {cap:g})")
    ax.legend(fontsize=7)
    ax.set_title("diff: error by depth")
    return _svg(fig, "diff")
