"""Big models: a generated model over 2 GB (external data) through `fold,fuse` (and `quantize` if asked).

The model is written straight to disk with its weights in an external data
file, one chunk of rows at a time (never two copies in memory). The CLI runs in
a child process whose peak RSS is measured (psutil polling plus the kernel's
ru_maxrss); the output is checked to load (external data), run and match the
original. Prints a markdown table and writes bench/results/big_model.md.
Usage: python bench/big_model.py [--dir DIR] [--pipelines fold,fuse;fold,quantize] [--keep]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Weight shapes of the default model: two 16384 x 16448 float32 matrices, 2.16 GB together.
K, M = 16384, 16448


def make_big_model(directory: str | os.PathLike, k: int = K, m: int = M, seed: int = 0) -> Path:
    """Write `big.onnx` + `big.onnx.data`: y = MatMul(Relu(Gemm(x, W1, b1) * s), W2) + b2, x: [N, k].

    W1 [k, m] and W2 [m, k] go to the external file in row chunks; `s` is a Constant
    node (fold makes it an initializer, fuse folds the Mul into the Gemm) and the
    MatMul + Add becomes a Gemm, so both passes rewrite the big weights.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = "big.onnx.data"
    big = []
    with open(d / data_name, "wb") as f:
        for name, (rows, cols) in (("W1", (k, m)), ("W2", (m, k))):
            offset = f.tell()
            for start in range(0, rows, 1024):
                n = min(1024, rows - start)
                chunk = rng.standard_normal((n, cols), dtype=np.float32) / np.float32(np.sqrt(rows))
                f.write(chunk.tobytes())
            t = TensorProto(name=name, dims=[rows, cols], data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                t.external_data.add(key=key, value=value)
            big.append(t)
    b1 = numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), "b1")
    b2 = numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), "b2")
    s = numpy_helper.from_array(rng.uniform(0.5, 1.5, m).astype(np.float32))
    nodes = [
        helper.make_node("Constant", [], ["s"], value=s),
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="gemm1"),
        helper.make_node("Mul", ["h", "s"], ["hs"], name="scale"),
        helper.make_node("Relu", ["hs"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["mm"], name="matmul2"),
        helper.make_node("Add", ["mm", "b2"], ["y"], name="add2"),
    ]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])], [*big, b1, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = d / "big.onnx"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def model_bytes(path: str | os.PathLike) -> int:
    """Size of a model on disk: the .onnx plus its external data files."""
    p = Path(path)
    m = onnx.load(str(p), load_external_data=False)
    from onnx.external_data_helper import _get_all_tensors

    locs = {e.value for t in _get_all_tensors(m) for e in t.external_data if e.key == "location"}
    return p.stat().st_size + sum((p.parent / loc).stat().st_size for loc in locs)


def outputs(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """The model's output for `x` on the CPU EP (the session is dropped before returning)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    del sess
    return y


def run_measured(argv: list[str]) -> tuple[int, float, int, str]:
    """Run `python -m onnxopt.cli ARGV` in a child; (exit code, seconds, peak RSS bytes, stderr)."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "onnxopt.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "ONNXOPT_PROGRESS": "0"})
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    err = child.stderr.read()
    child.wait()
    peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    return child.returncode, time.perf_counter() - t0, peak, err


def measure_one(src: Path, pipeline: str, out_dir: Path, calib: Path | None) -> dict:
    """Optimize `src` with `pipeline` in a fresh child process (so ru_maxrss is this run's) and check the result."""
    cmd = [sys.executable, __file__, "--child", str(src), pipeline, str(out_dir), str(calib or "")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    import json

    return json.loads(p.stdout.strip().splitlines()[-1])


def _child(src: str, pipeline: str, out_dir: str, calib: str) -> None:
    import json

    out = Path(out_dir) / f"out_{pipeline.replace(',', '_')}.onnx"
    argv = ["optimize", src, "-o", str(out), "-p", pipeline, "--quiet"] + (["--calib", calib] if calib else [])
    code, seconds, peak, err = run_measured(argv)
    row = {"pipeline": pipeline, "exit": code, "seconds": round(seconds, 1), "peak_rss": peak, "stderr": err.strip()}
    if code == 0:
        x = np.random.default_rng(1).standard_normal((2, K), dtype=np.float32)
        ref, got = outputs(src, x), outputs(out, x)
        row.update(out_bytes=model_bytes(out), max_abs=float(np.abs(ref - got).max()),
                   max_ref=float(np.abs(ref).max()), external=Path(str(out) + ".data").exists())
    print(json.dumps(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--pipelines", default="fold,fuse;fold,quantize")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "big_model.md"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="onnxopt-big-"))
    try:
        t0 = time.perf_counter()
        src = make_big_model(work)
        size = model_bytes(src)
        gen = time.perf_counter() - t0
        calib = work / "calib"
        calib.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(4):
            np.savez(calib / f"{i}.npz", x=rng.standard_normal((1, K), dtype=np.float32))
        rows = []
        for pipeline in filter(None, args.pipelines.split(";")):
            from onnxopt.registry import all_passes

            if any(p.split("{")[0] not in all_passes() for p in pipeline.split(",")):
                rows.append({"pipeline": pipeline, "exit": "-", "stderr": "pass not available"})
                continue
            rows.append(measure_one(src, pipeline, work, calib if "quantize" in pipeline else None))
        lines = [f"# Big model: {size / 1e9:.2f} GB with external data (generated in {gen:.0f} s)", "",
                 f"Model: Gemm(x, W1[{K}x{M}]) * s -> Relu -> MatMul(W2[{M}x{K}]) + b2, weights in big.onnx.data. "
                 "Peak RSS of the `onnxopt optimize` child process (psutil polling and ru_maxrss, larger of the "
                 "two); outputs compared on a [2, 16384] input with onnxruntime CPU.", "",
                 "| pipeline | exit | seconds | peak RSS | RSS / model size | output size | external data | "
                 "max abs error (max abs output) |", "|" + "---|" * 8]
        for r in rows:
            if r.get("exit") == 0:
                lines.append(f"| {r['pipeline']} | 0 | {r['seconds']} | {r['peak_rss'] / 1e9:.2f} GB | "
                             f"{r['peak_rss'] / size:.2f}x | {r['out_bytes'] / 1e9:.2f} GB | {r['external']} | "
                             f"{r['max_abs']:.2e} ({r['max_ref']:.2f}) |")
            else:
                lines.append(f"| {r['pipeline']} | {r['exit']} | {r.get('seconds', '-')} | "
                             f"{r.get('peak_rss', 0) / 1e9:.2f} GB | - | - | - | {r['stderr'][:150]} |")
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
