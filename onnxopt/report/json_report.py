"""JSON reports: deterministic, standard JSON (numpy values and non-finite floats made portable), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def _json_default(o: Any) -> Any:
    """What `json` cannot serialize itself: numpy scalars and arrays, sets, tuples, paths."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return v if np.isfinite(v) else str(v)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(obj: Any) -> Any:
    """Replace non-finite floats by strings ("inf", "nan") so the JSON is standard."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def to_json(report: dict) -> str:
    """Deterministic, standard JSON text of a report."""
    return json.dumps(_clean(json.loads(json.dumps(report, default=_json_default))), indent=2, sort_keys=True)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write a report as JSON atomically."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(to_json(report) + "\n")
    os.replace(tmp, p)
