"""The one-line terminal summary of a lowrank run, from its record."""

from __future__ import annotations

from typing import Any


def summary_line(record: dict[str, Any]) -> str:
    """`lowrank: 12 layers factorized, 28.0% of candidate parameters removed, min energy 0.981`."""
    stats = record.get("stats", {})
    if not record.get("changed"):
        return f"lowrank: changed nothing: {record.get('reason') or 'no reason given'}"
    ranked = [d for d in record.get("details", []) if d.get("rank")]
    energy = min((float(d["energy_kept"]) for d in ranked if "energy_kept" in d), default=None)
    line = (
        f"lowrank: {stats.get('factorized', 0)} layers factorized, "
        f"{100 * float(stats.get('fraction_removed', 0.0)):.1f}% of candidate parameters removed"
    )
    return line + (f", min energy {energy:.3f}" if energy is not None else "")
