"""The one-line terminal summary of a quantize run, from its record (stats and per-layer decisions)."""

from __future__ import annotations

from typing import Any

#: Words of a float layer's `why` -> the group the summary counts it in.
_FLOAT_GROUPS = (
    ("beyond the noise", "not faster beyond the noise"),
    ("slower", "slower"),
    ("sensitive", "sensitive"),
    ("excluded", "excluded"),
)


def summary_line(record: dict[str, Any]) -> str:
    """`quantize: 58/64 layers int8 (97% of MACs), 41.0 dB, est. 0.75x; float: 5 slower, 1 sensitive`."""
    stats = record.get("stats", {})
    if not record.get("changed"):
        return f"quantize: changed nothing: {record.get('reason') or 'no reason given'}"
    parts = [f"{stats.get('int8_layers', 0)}/{stats.get('candidates', 0)} layers int8"]
    if stats.get("int8_mac_share") is not None:
        parts[0] += f" ({100 * float(stats['int8_mac_share']):.0f}% of MACs)"
    if isinstance(stats.get("output_sqnr_db"), (int, float)):
        parts.append(f"{stats['output_sqnr_db']:.1f} dB")
    if isinstance(stats.get("latency_ratio"), (int, float)):
        parts.append(f"est. {stats['latency_ratio']:.2f}x")
    line = "quantize: " + ", ".join(parts)
    groups: dict[str, int] = {}
    for d in record.get("details", []):
        if d.get("int8") is False and not d.get("already_int8"):
            why = str(d.get("why", ""))
            group = next((g for word, g in _FLOAT_GROUPS if word in why), "other")
            groups[group] = groups.get(group, 0) + 1
    if groups:
        line += "; float: " + ", ".join(f"{n} {g}" for g, n in sorted(groups.items(), key=lambda kv: -kv[1]))
    return line
