"""Which pass made the candidate diverge: bisection over the models `optimize --dump-dir` saved.

The dump directory holds `00_input.onnx` and one `NN_<pass>.onnx` after each
pass (`onnxopt.framework.manager`). Each dump's outputs are compared with the
reference's on the same samples and judged with the same limits; the first
dump whose outputs break them names the pass. The search halves the range at
each step (a pass's divergence persists through later exact passes), so a long
pipeline costs a few runs of the model, one dump's session at a time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt.data.samples import Sample
from onnxopt.errors import UserError
from onnxopt.ir.model_io import load_model
from onnxopt.verify.comparison import SampleMetrics, merge_sample_metrics, output_metrics
from onnxopt.verify.diff.runs import ChunkRun, stage_weights
from onnxopt.verify.tolerance import Thresholds

_DUMP = re.compile(r"^(\d+)_(.+)\.onnx$")


def dumps_in(directory: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """(index, pass name, path) of each dump in `directory`, in pipeline order (index 0: the input)."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"--dump-dir {d}: not a directory (give the --dump-dir of 'onnxopt optimize')")
    found = sorted((int(m[1]), m[2], p) for p in d.iterdir() if (m := _DUMP.match(p.name)))
    if len(found) < 2:
        raise UserError(f"--dump-dir {d}: no per-pass dumps (NN_<pass>.onnx) in it")
    return found


def _outputs_diverge(
    ref_values: list[dict[str, np.ndarray]], path: Path, samples: list[Sample], limits: Thresholds
) -> tuple[bool, dict[str, Any]]:
    """Whether the dump at `path` breaks `limits` on some output, and its worst output's metrics."""
    model = load_model(path)
    stage_weights(model)
    names = list(ref_values[0])
    run = ChunkRun(model, names)
    rows: list[dict[str, SampleMetrics]] = []
    for sample, ref in zip(samples, ref_values):
        got = run.values(sample)
        rows.append({n: output_metrics(n, ref[n], got.get(n), 1, set()) for n in names})
    checks = merge_sample_metrics("pass", rows, limits)
    worst = min(checks, key=lambda c: float("inf") if c.sqnr_db is None else c.sqnr_db)
    return any(c.violations for c in checks), {
        "output": worst.output,
        "sqnr_db": worst.sqnr_db,
        "cosine": worst.cosine,
        "violations": [v for c in checks for v in c.violations],
    }


def bisect_dumps(ref: onnx.ModelProto, directory: str | os.PathLike, samples: list[Sample], limits: Thresholds) -> dict:
    """The pass whose dump first breaks `limits` on the outputs (see the module's docstring), as a dict with
    `pass`, `index`, `dump`, `runs`, the worst output `before` and `after` it, and a `message`."""
    dumps = dumps_in(directory)
    names = [o.name for o in ref.graph.output]
    ref_run = ChunkRun(ref, names)
    ref_values = [ref_run.values(s) for s in samples]
    del ref_run
    lo, hi = 0, len(dumps) - 1  # invariant: dump lo within the limits (the input), dump hi unknown
    probed: dict[int, tuple[bool, dict[str, Any]]] = {}
    diverged, last = _outputs_diverge(ref_values, dumps[hi][2], samples, limits)
    probed[hi] = (diverged, last)
    if not diverged:
        msg = f"bisection over {len(dumps) - 1} pass dumps: the last dump's outputs stay within the limits"
        return {"pass": None, "index": None, "dump": str(dumps[hi][2]), "runs": 1, "message": msg, "after": last}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probed[mid] = _outputs_diverge(ref_values, dumps[mid][2], samples, limits)
        lo, hi = (lo, mid) if probed[mid][0] else (mid, hi)
    index, name, path = dumps[hi]
    after = probed[hi][1]
    before = probed.get(lo, (False, {}))[1]
    msg = (
        f"pass {index} '{name}' introduced the divergence (bisection over {len(dumps) - 1} pass dumps, "
        f"{len(probed)} runs): worst output {after['output']} at {_db(after['sqnr_db'])} dB after it"
    )
    return {
        "pass": name,
        "index": index,
        "dump": str(path),
        "previous": str(dumps[lo][2]),
        "runs": len(probed),
        "before": before,
        "after": after,
        "message": msg,
    }


def _db(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
