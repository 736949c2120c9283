"""Benchmark: are the optimized zoo models byte-identical between two versions of onnxopt?

Runs every zoo model (with PP-OCR det/rec/cls) x pipeline of `bench/zoo.py` through the CLI
(`python -m onnxopt.cli optimize`, calibration data from `fixtures.zoo_data`, the quick sample
counts) and records the sha256 of every written model. With `--pythonpath DIR` the onnxopt
found in DIR is used instead of the installed one, so an old checkout (laid out as an
importable `onnxopt` package) can be compared with the current tree:

    python bench/identity.py --label before --pythonpath /tmp/old --json before.json
    python bench/identity.py --label after --json after.json --compare before.json

Writes a markdown table (bench/results/identity.md or --out) when --compare is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.zoo import MODELS, PIPELINES, QUICK, applicable, log  # noqa: E402
from fixtures import zoo_data  # noqa: E402


def run_all(
    models: list[str], pipelines: list[str], work: Path, pythonpath: str | None, timeout: int
) -> dict[str, dict[str, str]]:
    """{model: {pipeline: sha256 of the written model, or 'n/a: why' / 'exit N: last line'}}."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    env["ONNXOPT_PROGRESS"] = "0"
    out: dict[str, dict[str, str]] = {}
    for name in models:
        src = zoo_data.fixture_path(name)
        original = onnx.load(str(src), load_external_data=False)
        n_cal = QUICK[name][0]
        calib = work / name / "calib"
        zoo_data.write_feeds(zoo_data.TASKS[name].feeds(n_cal, zoo_data.CALIB_SEED, zoo_data.MODELS), calib)
        out[name] = {}
        for alias in pipelines:
            why = applicable(original, alias)
            if why:
                out[name][alias] = f"n/a: {why}"
                continue
            dst = work / name / f"{alias}.onnx"
            cmd = [
                sys.executable,
                "-m",
                "onnxopt.cli",
                "optimize",
                str(src),
                "-o",
                str(dst),
                "-p",
                PIPELINES[alias],
                "--calib",
                str(calib),
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work, env=env)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or [""])[-1][:120]
                out[name][alias] = f"exit {proc.returncode}: {tail}"
            else:
                out[name][alias] = hashlib.sha256(dst.read_bytes()).hexdigest()
            log(f"{name} {alias}: {out[name][alias][:16]} ({time.perf_counter() - t0:.0f}s)")
    return out


def markdown(before: dict, after: dict, labels: tuple[str, str]) -> str:
    """One row per model x pipeline: both digests (shortened) and whether they are equal."""
    lines = [
        f"# Byte identity of optimized zoo models: {labels[0]} vs {labels[1]}",
        "",
        "`python bench/identity.py` (quick calibration counts of bench/zoo.py); sha256 of each written model.",
        "",
        f"| model | pipeline | {labels[0]} | {labels[1]} | identical |",
        "|---|---|---|---|---|",
    ]
    same = total = 0
    for model, rows in after.items():
        for alias, digest in rows.items():
            old = before.get(model, {}).get(alias, "missing")
            eq = old == digest
            total += 1
            same += eq
            lines.append(f"| {model} | {alias} | `{old[:16]}` | `{digest[:16]}` | {'yes' if eq else '**NO**'} |")
    lines += ["", f"{same} of {total} identical."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--pythonpath", help="directory holding the onnxopt package to run instead of the installed one")
    ap.add_argument("--label", default="current")
    ap.add_argument("--json", type=Path, required=True, help="where to write this run's digests")
    ap.add_argument("--compare", type=Path, help="digests of an earlier run to compare with")
    ap.add_argument("--compare-label", default="before")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "identity.md")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxopt-identity-") as tmp:
        digests = run_all(args.models.split(","), args.pipelines.split(","), Path(tmp), args.pythonpath, args.timeout)
    args.json.write_text(json.dumps({"label": args.label, "digests": digests}, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())["digests"]
        text = markdown(before, digests, (args.compare_label, args.label))
        args.out.write_text(text)
        print(text)
        return 0 if "**NO**" not in text else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
