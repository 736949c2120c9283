"""One line per pass run for the terminal: a pass's own `summarize(record)` when it has one, else this
generic line from its stats (the changed flag and its largest non-zero counts)."""

from __future__ import annotations

from typing import Any


def generic_summary(record: dict[str, Any]) -> str:
    """`fold: folded_nodes=38, constant_bytes_added=1654808, identity_removed=1` or why nothing changed."""
    name = record.get("name", "?")
    if not record.get("changed"):
        return f"{name}: changed nothing: {record.get('reason') or 'no reason given'}"
    counts = [
        (k, v)
        for k, v in record.get("stats", {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v
    ]
    counts.sort(key=lambda kv: -abs(kv[1]))
    text = ", ".join(f"{k}={v}" for k, v in counts[:3])
    return f"{name}: {text or 'changed the graph'}"
