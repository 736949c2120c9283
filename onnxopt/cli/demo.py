"""`onnxopt demo`: the main job on a real model that needs nothing but the package index.

Fetches PP-OCR's orientation classifier from the `rapidocr-onnxruntime` wheel,
optimizes it, checks the result against the original on the CPU EP, times both,
and prints a before/after table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxopt.api import optimize
from onnxopt.cli.logs import add_logging_options
from onnxopt.data.samples import seeded_inputs
from onnxopt.data.wheel_models import fetch_ppocr
from onnxopt.ir.model_io import load_model
from onnxopt.report.json_report import write_json
from onnxopt.report.tables import format_report, table
from onnxopt.runtime.timing import median_latencies

EPILOG = """\
examples:
  onnxopt demo                                   # fold,fuse into ./onnxopt-demo
  onnxopt demo --out /tmp/demo --pipeline fold   # another pipeline, another directory
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `demo` and its options."""
    p = sub.add_parser(
        "demo",
        help="optimize PP-OCR's orientation classifier (fetched from its PyPI wheel)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--out", default="onnxopt-demo", help="directory for the models and report (default ./onnxopt-demo)")
    p.add_argument("--pipeline", default="fold,fuse", help="pipeline to demonstrate (default fold,fuse)")
    add_logging_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo into --out with --pipeline."""
    return run_demo(Path(args.out), args.pipeline)


def run_demo(out_dir: Path, pipeline: str = "fold,fuse") -> int:
    """Fetch, optimize, check, time; returns the exit code (1 if the check failed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching PP-OCR cls from the rapidocr-onnxruntime wheel into {out_dir} ...")
    src = fetch_ppocr(out_dir, ("cls",))["cls"]
    shapes: dict[str, tuple[int, ...]] = {"x": (1, 3, 48, 192)}
    result = optimize(src, pipeline=pipeline, check=3, input_shapes=shapes)
    out = result.save(out_dir / "cls.opt.onnx")
    write_json(result.report, out_dir / "report.json")
    print(f"\n{src.name} -> {out.name}  (pipeline: {pipeline})\n")
    print(format_report(result.report))
    original = load_model(src)
    feeds = seeded_inputs(original, 1, 0, shapes)[0]
    before, after = median_latencies([str(src), str(out)], feeds, runs=30)
    print()
    print(
        table(
            ["CPU EP latency (2 threads, median of 30)", "before", "after", "ratio"],
            [["cls 1x3x48x192", f"{before * 1e3:.2f} ms", f"{after * 1e3:.2f} ms", f"{after / before:.2f}x"]],
        )
    )
    print(f"\nreport: {out_dir / 'report.json'}")
    return 0 if result.report["check"]["ok"] else 1
