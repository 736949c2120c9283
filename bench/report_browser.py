"""Bench: the HTML report of `fold,fuse,quantize` on PP-OCRv4 rec and MiniLM, rendered in headless Chromium.

For each model: `onnxopt optimize M -o Q -p fold,fuse,quantize --calib DIR --report R.json`, then
`onnxopt diff M Q --report D.json` and `onnxopt report R.json --diff D.json -o R.html`; the page is
opened from disk in Debian's chromium (`apt-get install chromium`) with networking features off,
a screenshot goes to bench/results/report_<model>.png, and the browser's console messages
(`--enable-logging=stderr --v=0`: lines with CONSOLE) and any request for a network address are
counted. Prints a Markdown table (also written to bench/results/report_browser.md).

    python bench/report_browser.py [--models rec,minilm] [--samples 8]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import ocr_data, zoo_data  # noqa: E402
from onnxopt.data import wheel_models  # noqa: E402

MODELS_DIR = ROOT / ".fixtures" / "models"
RESULTS = ROOT / "bench" / "results"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1200,2400",
]


def write_calib(name: str, out: Path, n: int) -> None:
    """Calibration samples of the model's task (rendered text lines; English sentences)."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "rec":
        ocr_data.write_calibration_dir(ocr_data.rec_samples(n, seed=0), out, input_name="x")
        return
    for i, feeds in enumerate(zoo_data.minilm_feeds(n, seed=0, batch=1)):
        np.savez(out / f"{i:05d}.npz", **feeds)


def onnxopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onnxopt", *args], check=True)


def render(page: Path, shot: Path, tmp: Path) -> tuple[int, list[str], float]:
    """Screenshot `page`; return chromium's exit code, its console lines, and seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or re.search(r"https?://", line)]
    return proc.returncode, console, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="rec,minilm")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print("chromium missing: apt-get update && apt-get install -y chromium", file=sys.stderr)
        return 2
    rows = []
    for name in args.models.split(","):
        model = wheel_models.model_file(name, MODELS_DIR)
        with tempfile.TemporaryDirectory(prefix="report-browser-") as t:
            tmp = Path(t)
            write_calib(name, tmp / "calib", args.samples)
            q, r, d, page = tmp / "q.onnx", tmp / "r.json", tmp / "d.json", tmp / "r.html"
            onnxopt("optimize", str(model), "-o", str(q), "-p", "fold,fuse,quantize", "--calib", str(tmp / "calib"),
                    "--report", str(r), "-q")  # fmt: skip
            subprocess.run([sys.executable, "-m", "onnxopt", "diff", str(model), str(q), "--data", str(tmp / "calib"),
                            "--samples", "2", "--report", str(d), "-q"], check=False)  # fmt: skip
            onnxopt("report", str(r), "--diff", str(d), "-o", str(page), "-q")
            shot = RESULTS / f"report_{name}.png"
            code, console, seconds = render(page, shot, tmp)
            size = page.stat().st_size
            svgs = page.read_text().count("<svg")
        rows.append((name, size, svgs, code, len(console), shot.exists(), seconds, console[:3]))
        print(f"{name}: exit {code}, {len(console)} console lines, screenshot {shot}", file=sys.stderr)
    lines = ["| model | page bytes | charts | chromium exit | console lines | screenshot | seconds |", "|---" * 7 + "|"]
    for n, s, c, e, k, ok, sec, _ in rows:
        lines.append(f"| {n} | {s} | {c} | {e} | {k} | {'yes' if ok else 'no'} | {sec:.1f} |")
    for n, *_, con in rows:
        lines += [f"- {n} console: {line}" for line in con]
    text = "\n".join(lines)
    print(text)
    (RESULTS / "report_browser.md").write_text(f"# HTML report in headless Chromium\n\n{text}\n")
    return 0 if all(r[3] == 0 and r[4] == 0 and r[5] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
