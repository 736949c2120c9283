"""Latency decisions repeated on this machine: single-shot medians against repeated interleaved
measurements with a confidence test (`onnxopt.runtime.decide`).

For dense-vs-factorized layer pairs (`passes.lowrank.timing.layer_models`) spanning clear wins,
near-ties and clear losses, each decision is taken `--repeats` times both ways: the old way
(`median_latencies`, 30 interleaved runs, "faster" when the ratio is under 1) and the new way
(`decide.measure`, "faster"/"slower" only beyond the 95% interval of the paired ratios, else
"undecided"). A stable method gives the same answer on every repeat; the load average at the
start is written next to the table, since the point is behaviour on a busy machine.
Writes bench/results/timing_decisions.md.

    python bench/timing_decisions.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.passes.lowrank.timing import layer_models  # noqa: E402
from onnxopt.runtime import decide  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402

#: (label, kind, input shape, m, n, rank)
PAIRS = (
    ("MatMul 256x256 r16", "MatMul", (64, 256), 256, 256, 16),
    ("MatMul 256x256 r96", "MatMul", (64, 256), 256, 256, 96),
    ("MatMul 256x256 r128", "MatMul", (64, 256), 256, 256, 128),
    ("MatMul 256x256 r160", "MatMul", (64, 256), 256, 256, 160),
    ("Conv1x1 128->128 r64", "Conv", (1, 128, 16, 16), 128, 128, 64),
)


def _counts(verdicts: list[str]) -> str:
    c = collections.Counter(verdicts)
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for label, kind, shape, m, n, rank in PAIRS:
        dense, fact, feed = layer_models(kind, shape, m, n, rank)
        old, new, old_s, new_s, ratios = [], [], 0.0, 0.0, []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            d, f = median_latencies([dense, fact], feed, runs=30)
            t1 = time.perf_counter()
            reps = decide.measure([dense, fact], feed, runs=30)
            t2 = time.perf_counter()
            old.append("faster" if f / d < 1 else "slower")
            c = reps.comparison()
            new.append(c.verdict)
            ratios.append(c.describe())
            old_s, new_s = old_s + t1 - t0, new_s + t2 - t1
        rows.append(
            f"| {label} | {_counts(old)} | {_counts(new)} | {'; '.join(ratios)} | "
            f"{old_s / args.repeats:.2f} | {new_s / args.repeats:.2f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# Latency decisions: single-shot medians vs repeated measurements with a confidence test",
            "",
            f"`python bench/timing_decisions.py --repeats {args.repeats}`; CPU EP, 2 threads; "
            f"load average {load:.1f} on {os.cpu_count()} CPUs at the start.",
            "Factorized vs dense, decided `--repeats` times each way; new ratios are medians of",
            "per-repetition ratios with their 95% interval.",
            "",
            "| pair | old verdicts | new verdicts | new ratio (interval) per repeat | old s | new s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    out = ROOT / "bench" / "results" / "timing_decisions.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
