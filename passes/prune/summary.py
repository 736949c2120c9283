"""The one-line terminal summary of a prune run, from its record."""

from __future__ import annotations

from typing import Any


def summary_line(record: dict[str, Any]) -> str:
    """`prune: 412 channels in 9/31 groups, MACs -30.1%, guard: ...`."""
    stats = record.get("stats", {})
    if not record.get("changed"):
        return f"prune: changed nothing: {record.get('reason') or 'no reason given'}"
    groups = record.get("details", [])
    cut = sum(1 for g in groups if g.get("channels_after", 0) < g.get("channels_before", 0))
    line = (
        f"prune: {stats.get('removed_channels', 0)} channels in {cut}/{len(groups)} groups, "
        f"MACs -{100 * float(stats.get('mac_reduction', 0.0)):.1f}%"
    )
    return line + (f", guard: {stats['guard']}" if stats.get("guard") else "")
