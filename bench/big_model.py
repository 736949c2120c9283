"""Big models: generated models over 2 GB (external data) through `fold,fuse` and `fold,quantize`.

The model is written straight to disk with its weights in an external data
file, one chunk of rows at a time (never two copies in memory). The CLI runs in
a child process whose peak RSS is measured (psutil polling plus the kernel's
ru_maxrss); the output is checked to load (external data), run and match the
original. Prints a markdown table and writes bench/results/big_model.md.
Usage: python bench/big_model.py [--dir DIR] [--layers 2,8] [--pipelines 'fold,fuse;fold,quantize'] [--keep]
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

#: Model shapes, 2.16 GB each: (layers, k, m); weights alternate [k, m] and [m, k].
SHAPES = {2: (16384, 16448), 8: (8192, 8224)}
K, M = SHAPES[2]


def make_big_model(directory: str | os.PathLike, k: int = K, m: int = M, seed: int = 0, layers: int = 2) -> Path:
    """Write `big.onnx` + `big.onnx.data`: `layers - 1` blocks Relu(Gemm(h, W_i, b_i) * s_i), then
    MatMul(h, W_last) + b; x: [N, k], weights alternately [k, m] and [m, k].

    Weights go to the external file in row chunks (never two copies in memory); each
    `s_i` is a Constant node (fold makes it an initializer, fuse folds the Mul into the
    Gemm) and the MatMul + Add becomes a Gemm, so both passes rewrite the big weights.
    Two layers of 1.08 GB are the worst case for memory (one weight is half the model);
    eight of 270 MB are closer to real big models, whose weights are many and smaller.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = "big.onnx.data"
    dims = [k if i % 2 == 0 else m for i in range(layers + 1)]
    big = []
    with open(d / data_name, "wb") as f:
        for i in range(layers):
            rows, cols = dims[i], dims[i + 1]
            offset = f.tell()
            for start in range(0, rows, 1024):
                n = min(1024, rows - start)
                chunk = rng.standard_normal((n, cols), dtype=np.float32) / np.float32(np.sqrt(rows))
                f.write(chunk.tobytes())
            t = TensorProto(
                name=f"W{i + 1}", dims=[rows, cols], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL
            )
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
                t.external_data.add(key=key, value=value)
            big.append(t)
    nodes, small, h = [], [], "x"
    for i in range(layers - 1):
        n = i + 1
        small.append(numpy_helper.from_array(rng.standard_normal(dims[n]).astype(np.float32), f"b{n}"))
        s = numpy_helper.from_array(rng.uniform(0.5, 1.5, dims[n]).astype(np.float32))
        nodes += [
            helper.make_node("Constant", [], [f"s{n}"], value=s),
            helper.make_node("Gemm", [h, f"W{n}", f"b{n}"], [f"h{n}"], name=f"gemm{n}"),
            helper.make_node("Mul", [f"h{n}", f"s{n}"], [f"hs{n}"], name=f"scale{n}"),
            helper.make_node("Relu", [f"hs{n}"], [f"r{n}"], name=f"relu{n}"),
        ]
        h = f"r{n}"
    small.append(numpy_helper.from_array(rng.standard_normal(dims[-1]).astype(np.float32), f"b{layers}"))
    nodes += [
        helper.make_node("MatMul", [h, f"W{layers}"], ["mm"], name=f"matmul{layers}"),
        helper.make_node("Add", ["mm", f"b{layers}"], ["y"], name=f"add{layers}"),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])],
        [*big, *small],
    )
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
    child = subprocess.Popen(
        [sys.executable, "-m", "onnxopt.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ONNXOPT_PROGRESS": "0"},
    )
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
    report = Path(out_dir) / "report.json"
    argv = ["optimize", src, "-o", str(out), "-p", pipeline, "--quiet", "--report", str(report)] + (
        ["--calib", calib] if calib else []
    )
    code, seconds, peak, err = run_measured(argv)
    row = {"pipeline": pipeline, "exit": code, "seconds": round(seconds, 1), "peak_rss": peak, "stderr": err.strip()}
    if code == 0:
        meta = onnx.load(src, load_external_data=False)
        width = meta.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        x = np.random.default_rng(1).standard_normal((2, width), dtype=np.float32)
        ref, got = outputs(src, x), outputs(out, x)
        stats = json.loads(report.read_text())["passes"][-1]["stats"]
        what = {
            k: stats[k]
            for k in ("int8_layers", "int8_stored_layers", "affine_folded", "matmul_add_to_gemm")
            if k in stats
        }
        row.update(
            out_bytes=model_bytes(out),
            sqnr=_sqnr(ref, got),
            max_ref=float(np.abs(ref).max()),
            external=Path(str(out) + ".data").exists(),
            what=what,
            latency=_latency_ratio(src, out, x[:1]),
        )
    print(json.dumps(row))


def _latency_ratio(original: Path | str, optimized: Path | str, x: np.ndarray) -> float:
    """Median time of `optimized` over `original` on `x` (`onnxopt.runtime.timing`: interleaved runs, CPU EP,
    2 threads; both sessions held: this is the bench process, not the one whose memory is measured)."""
    from onnxopt.runtime.timing import median_latencies

    t_original, t_optimized = median_latencies([str(original), str(optimized)], {"x": x}, runs=20)
    return t_optimized / t_original


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(((ref - got).astype(np.float64) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / noise)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--pipelines", default="fold,fuse;fold,quantize")
    ap.add_argument("--layers", default="2,8", help="model shapes to run, by layer count (2 and/or 8)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "big_model.md"))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="onnxopt-big-"))
    lines = [
        "# Big models: 2.16 GB with external data through the CLI",
        "",
        "Peak RSS of the `onnxopt optimize` child process (psutil polling and ru_maxrss, larger of the two); "
        "outputs of the result compared with the original's on a [2, k] input with onnxruntime CPU (SQNR; "
        "inf = identical); latency: median of 20 interleaved batch-1 runs, CPU EP, 2 threads, "
        "optimized over original. Quantize: 4 calibration samples, default options.",
        "",
        "| layers (weight each) | pipeline | exit | seconds | peak RSS | RSS / model size | output size | "
        "what changed | output SQNR dB | latency vs original |",
        "|" + "---|" * 10,
    ]
    try:
        for layers in (int(v) for v in args.layers.split(",")):
            k, m = SHAPES[layers]
            shutil.rmtree(work / f"l{layers}", ignore_errors=True)
            src = make_big_model(work / f"l{layers}", k, m, layers=layers)
            size = model_bytes(src)
            calib = work / f"l{layers}" / "calib"
            calib.mkdir(exist_ok=True)
            rng = np.random.default_rng(0)
            for i in range(4):
                np.savez(calib / f"{i}.npz", x=rng.standard_normal((1, k), dtype=np.float32))
            label = f"{layers} ({size / layers / 1e6:.0f} MB)"
            for pipeline in filter(None, args.pipelines.split(";")):
                r = measure_one(src, pipeline, src.parent, calib if "quantize" in pipeline else None)
                if r.get("exit") == 0:
                    what = ", ".join(f"{k}={v}" for k, v in r["what"].items())
                    lines.append(
                        f"| {label} | {pipeline} | 0 | {r['seconds']} | {r['peak_rss'] / 1e9:.2f} GB | "
                        f"{r['peak_rss'] / size:.2f}x | {r['out_bytes'] / 1e9:.2f} GB | {what} | "
                        f"{r['sqnr']:.1f} | {r['latency']:.2f} |"
                    )
                else:
                    lines.append(
                        f"| {label} | {pipeline} | {r['exit']} | {r.get('seconds', '-')} | "
                        f"{r.get('peak_rss', 0) / 1e9:.2f} GB | - | - | {r['stderr'][:150]} | - | - |"
                    )
                print(lines[-1], flush=True)
            shutil.rmtree(work / f"l{layers}", ignore_errors=True)
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return 0
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
