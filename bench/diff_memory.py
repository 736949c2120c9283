"""Bench: peak RSS of `onnxopt diff` on zoo model pairs and on a generated model over 1 GB.

Each pair is (original, `optimize -p fold,quantize --calib` of it), made into a temporary
directory. `onnxopt diff REF CAND --data CALIB --samples S` runs as a child process; its peak
RSS is the larger of psutil polling (every 20 ms) and the kernel's ru_maxrss from `os.wait4`.

The bound checked is the one of issue #18: 2x the larger model's size on disk (the .onnx plus
its external data) plus one chunk. One chunk is what comparing a chunk of tensors costs on one
sample: the RSS a reference run with the chunk exposed adds above its session (its inner
tensors while it runs, the chunk's values), plus the chunk's values twice more (the
candidate's and the layer model's copies). It is measured in a child process that runs the
reference over the same samples a chunk at a time; the costliest chunk counts. The bound is
applied to the RSS above the process's fixed cost (interpreter, numpy, onnx, onnxruntime and
two sessions), measured in the same run as the peak RSS of a diff of a 4 KB model with
itself; the raw RSS is shown too.

The big model (`bench/big_model.make_big_model`: 8 layers of Gemm/Mul/Relu, float32 weights
in an external data file) is written to a temporary directory and removed at the end; the
model, its quantized candidate and diff's staged copies stay under 3 GB of disk.

    python bench/diff_memory.py [--models magika,layout_cdla,minilm] [--big-k 5888] [--samples 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from big_model import make_big_model, model_bytes  # noqa: E402

from fixtures import zoo_data  # noqa: E402
from onnxopt.data.samples import CalibrationData  # noqa: E402
from onnxopt.ir.model_io import load_model  # noqa: E402
from onnxopt.verify.diff.matching import match_tensors  # noqa: E402
from onnxopt.verify.diff.runs import ChunkRun, stage_weights  # noqa: E402

MODELS_DIR = ROOT / ".fixtures" / "models"
RESULTS = ROOT / "bench" / "results"
CHUNK = 32  # diff's default --chunk
GB = 1e9
MB = 1e6


def calib_feeds(name: str, n: int) -> list[dict[str, np.ndarray]]:
    """`n` samples of the model's task (file bytes, rendered pages, English sentences)."""
    if name == "magika":
        return zoo_data.magika_feeds(n, seed=0, batch=1)
    if name == "layout_cdla":
        return zoo_data.layout_feeds(n, seed=0)
    if name == "minilm":
        return zoo_data.minilm_feeds(n, seed=0, batch=1)
    raise SystemExit(f"no calibration data for {name}")


def peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int]:
    """Run `cmd`; return its exit code, seconds, and peak RSS in bytes (polling and ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    polled = [0]
    done = threading.Event()

    def poll() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                polled[0] = max(polled[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        print(err[-2000:], file=sys.stderr)
    return proc.returncode, time.perf_counter() - t0, max(polled[0], usage.ru_maxrss * 1024)


def chunk_cost(ref_path: str, cand_path: str, calib: str, samples: int) -> None:
    """(Child process) print the largest cost of one chunk: for each chunk of `CHUNK` compared
    tensors, the reference runs over the samples with that chunk exposed; the chunk's cost is the
    RSS its runs add above the session's (polled) plus its values twice more (the candidate's and
    the layer model's copies, held while the next run works)."""
    ref = load_model(ref_path)
    cand = load_model(cand_path, load_external=False)
    names = [m.ref for m in match_tensors(ref, cand)]
    del cand
    stage_weights(ref)
    feeds = list(CalibrationData(calib, ref, limit=samples))
    me = psutil.Process()
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=poll, daemon=True).start()
    worst = (0, 0, 0)
    for start in range(0, len(names), CHUNK):
        run = ChunkRun(ref, names[start : start + CHUNK])
        base = me.memory_info().rss
        peak[0] = base
        values = 0
        for sample in feeds:
            out = run.values(sample)
            values = max(values, sum(np.asarray(v).nbytes for v in out.values()))
            del out
        delta = max(peak[0] - base, values)
        if delta + 2 * values > worst[0]:
            worst = (delta + 2 * values, delta, values)
        del run
    done.set()
    print(*worst)


def chunk_bytes(ref: Path, cand: Path, calib: Path, samples: int) -> tuple[int, int, int]:
    """(cost, run's added RSS, values) of the costliest chunk, measured in a child process."""
    cmd = [sys.executable, __file__, "--chunk-cost", str(ref), str(cand), str(calib), str(samples)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def onnxopt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "onnxopt", *args, "-q"], check=True)


def measure_pair(label: str, ref: Path, cand: Path, calib: Path, samples: int, base: int) -> dict:
    """Diff `cand` against `ref` in a child process and judge its peak RSS against the bound."""
    cmd = [sys.executable, "-m", "onnxopt", "diff", str(ref), str(cand), "--data", str(calib)]
    code, seconds, rss = peak_rss([*cmd, "--samples", str(samples), "-q"])
    sizes = (model_bytes(ref), model_bytes(cand))
    chunk, run_rss, values = chunk_bytes(ref, cand, calib, samples)
    bound = 2 * max(sizes) + chunk
    row = {"model": label, "exit": code, "seconds": seconds, "rss": rss, "ref": sizes[0], "cand": sizes[1]}
    row.update(chunk=chunk, run_rss=run_rss, values=values, bound=bound, above=rss - base, ok=rss - base <= bound)
    print(f"{label}: {row}", file=sys.stderr)
    return row


def zoo_pair(name: str, tmp: Path, samples: int, base: int) -> dict:
    model = MODELS_DIR / f"{name}.onnx"
    calib = tmp / name / "calib"
    zoo_data.write_feeds(calib_feeds(name, max(samples, 4)), calib)
    cand = tmp / name / "q.onnx"
    onnxopt("optimize", str(model), "-o", str(cand), "-p", "fold,quantize", "--calib", str(calib))
    return measure_pair(name, model, cand, calib, samples, base)


def big_pair(tmp: Path, k: int, samples: int, base: int) -> dict:
    d = tmp / "big"
    ref = make_big_model(d, k=k, m=k + 32, layers=8)
    calib = d / "calib"
    rng = np.random.default_rng(0)
    zoo_data.write_feeds([{"x": rng.standard_normal((1, k), dtype=np.float32)} for _ in range(4)], calib)
    cand = d / "q.onnx"
    t0 = time.perf_counter()
    onnxopt("optimize", str(ref), "-o", str(cand), "-p", "fold,quantize", "--calib", str(calib))
    print(f"big: quantized in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return measure_pair(f"generated, 8 layers, k={k}", ref, cand, calib, samples, base)


def fixed_cost(tmp: Path) -> int:
    """Peak RSS of a diff of a 4 KB model with itself: the interpreter, libraries and sessions."""
    ref = make_big_model(tmp / "tiny", k=16, m=16, layers=2)
    rng = np.random.default_rng(0)
    calib = tmp / "tiny" / "calib"
    zoo_data.write_feeds([{"x": rng.standard_normal((1, 16), dtype=np.float32)}], calib)
    return peak_rss([sys.executable, "-m", "onnxopt", "diff", str(ref), str(ref), "--data", str(calib), "-q"])[2]


def table(rows: list[dict], base: int) -> str:
    head = (
        "| model | ref size | cand size | chunk: values | chunk: run adds | one chunk | bound "
        "| peak RSS | RSS - fixed | within | exit | seconds |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ref'] / MB:.1f} MB | {r['cand'] / MB:.1f} MB | {r['values'] / MB:.1f} MB "
            f"| {r['run_rss'] / MB:.1f} MB | {r['chunk'] / MB:.1f} MB "
            f"| {r['bound'] / MB:.0f} MB | {r['rss'] / MB:.0f} MB | {r['above'] / MB:.0f} MB "
            f"| {'yes' if r['ok'] else 'NO'} ({r['above'] / r['bound']:.2f}x) | {r['exit']} | {r['seconds']:.1f} |"
        )
    lines.append(f"\nFixed cost (diff of a 4 KB model with itself): {base / MB:.0f} MB peak RSS.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="magika,layout_cdla,minilm")
    ap.add_argument("--big-k", type=int, default=5888, help="big model's width (5888: 1.12 GB; 0: skip)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--chunk-cost", nargs=4, metavar=("REF", "CAND", "CALIB", "SAMPLES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_cost:
        chunk_cost(*args.chunk_cost[:3], int(args.chunk_cost[3]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="diff-memory-") as t:
        tmp = Path(t)
        base = fixed_cost(tmp)
        for name in filter(None, args.models.split(",")):
            rows.append(zoo_pair(name, tmp, args.samples, base))
            shutil.rmtree(tmp / name)
        if args.big_k:
            rows.append(big_pair(tmp, args.big_k, args.samples, base))
    text = table(rows, base)
    print(text)
    (RESULTS / "diff_memory.md").write_text(
        "# Peak RSS of `onnxopt diff`\n\n"
        "Candidate: `optimize -p fold,quantize --calib` (4 samples of the model's task); "
        f"diff over {args.samples} of them, default chunk ({CHUNK} tensors), CPU EP. "
        "Bound: 2x the larger model's size + one chunk (the RSS one reference run with the chunk's "
        "tensors exposed adds, plus the chunk's values twice more: candidate and layer model), "
        "applied to the peak RSS above the fixed cost (see the script's docstring).\n\n"
        f"{text}\n"
    )
    return 0 if all(r["ok"] and r["exit"] in (0, 1) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
