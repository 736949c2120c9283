"""Full conformance run: every ONNX backend test case before and after `fold,fuse`.

Prints the markdown report and writes it to bench/results/conformance.md.
Usage: python bench/conformance.py [--kinds node,simple,...] [--pipeline fold,fuse] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("ONNXOPT_PROGRESS", "0")

from onnxopt.testing.conformance import KINDS, iter_cases, markdown, run_corpus, sample_cases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--pipeline", default="fold,fuse")
    ap.add_argument("--limit", type=int, default=0, help="a seeded sample of this many cases (0 = all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "conformance.md"))
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = ap.parse_args()
    cases = list(iter_cases(args.kinds.split(",")))
    if args.limit:
        cases = sample_cases(cases, args.limit)
    t0 = time.perf_counter()

    def progress(o):
        if args.verbose or o.regression:
            flag = "REGRESSION" if o.regression else ("ok" if o.opt_ok else "ort-fail" if not o.ort_ok else "?")
            print(
                f"{o.kind}/{o.name}: {flag} {o.nodes_before}->{o.nodes_after} {o.message}", file=sys.stderr, flush=True
            )

    summary = run_corpus(cases, args.pipeline, progress)
    seconds = time.perf_counter() - t0
    slowest = sorted(summary.outcomes, key=lambda o: -o.seconds)[:5]
    text = (
        f"# Conformance: ONNX backend test corpus through `{args.pipeline}`\n\n"
        f"onnx {__import__('onnx').__version__}, onnxruntime {__import__('onnxruntime').__version__} (CPU EP); "
        f"each case compared with its expected outputs by onnx's backend runner check "
        f"(rtol 1e-3, atol 1e-7 unless the case says otherwise), before and after optimization. "
        f"{len(cases)} cases in {seconds:.0f} s (`python bench/conformance.py`).\n\n"
        + markdown(summary, args.pipeline)
        + "\n\nSlowest cases: "
        + ", ".join(f"{o.kind}/{o.name} {o.seconds:.1f}s" for o in slowest)
        + "\n"
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 1 if summary.regressions else 0


if __name__ == "__main__":
    sys.exit(main())
