"""Benchmark: onnxopt's quantize pass against onnxruntime's quantize_static on PP-OCR rec/cls/det.

Each quantizer runs in its own subprocess so its peak RSS (ru_maxrss of the
child) and wall time are its own; onnxruntime's quantizers run under an
address-space cap (--mem-cap-gb) and a timeout, so a histogram calibrator that
would take the shared machine's memory fails alone and is reported as such.
onnxopt runs through the CLI, the one command of the issue:
`onnxopt optimize M -o Q -p fold,quantize --calib DIR` (cold caches). Accuracy: rec exact-match text accuracy
(200 strings, seed 1; calibration 32 strings, seed 0), cls orientation accuracy
(300 images, 0/180), det output SQNR and text-mask IoU against float. Latency:
CPU EP, 2 threads, float and int8 runs interleaved, medians. Writes
bench/results/quantize.md.

    python bench/quantize.py [--models rec,cls,det] [--ort minmax,percentile,entropy] [--calib128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import ocr_data  # noqa: E402
from fixtures.fetch_models import model_path  # noqa: E402

CHILD = r"""
import sys, time, json, resource
kind, src, dst, calib = sys.argv[1:5]
t = time.perf_counter()
if kind.startswith("onnxopt"):
    from onnxopt.cli import main
    pipeline = "fold,quantize" if kind == "onnxopt" else \
        "fold,quantize{latency_aware=false,accuracy_aware=false,check_latency=false}"
    code = main(["optimize", src, "-o", dst, "-p", pipeline, "--calib", calib, "--report", dst + ".json"])
    if code != 0:
        raise SystemExit(code)
    report = json.load(open(dst + ".json"))
    stats = next(p for p in report["passes"] if p.get("name", p.get("pass")) == "quantize")["stats"]
else:
    import glob, numpy as np
    from onnxruntime.quantization import quantize_static, CalibrationDataReader, QuantFormat, CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process
    class R(CalibrationDataReader):
        def __init__(s): s.it = iter(sorted(glob.glob(calib + "/*.npz")))
        def get_next(s):
            p = next(s.it, None)
            return None if p is None else dict(np.load(p))
    import onnx
    pre = dst + ".pre.onnx"
    onnx.save(onnx.version_converter.convert_version(onnx.load(src), 13), pre)  # per-channel needs opset 13
    try:
        quant_pre_process(pre, pre, skip_symbolic_shape=True)
    except Exception:
        pass
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[kind]
    quantize_static(pre, dst, R(), quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=method)
    stats = {}
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "stats": stats}))
"""


def run_quantizer(kind: str, src: Path, dst: Path, calib: Path, timeout: int, mem_cap_gb: float) -> dict:
    """Run one quantizer in a subprocess; returns seconds, peak RSS, stats or the error.

    onnxruntime's quantizers get an address-space limit of `mem_cap_gb` (their histogram
    calibrators grow with the data); onnxopt runs unlimited so its peak RSS is what it needs.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), ONNXOPT_PROGRESS="0")
    cap = int(mem_cap_gb * 2**30)

    def limit() -> None:
        if not kind.startswith("onnxopt"):
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(src), str(dst), str(calib)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["failed"])[-1][:100]
        if (
            "MemoryError" in proc.stderr
            or "bad_alloc" in proc.stderr
            or "Failed to allocate" in proc.stderr
            or proc.returncode in (-9, -6)
        ):
            return {
                "error": f"out of memory at the {mem_cap_gb:g} GB cap after {time.perf_counter() - t0:.0f}s ({tail})"
            }
        return {"error": f"crashed ({tail})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def latency_ratio(float_path: Path, q_path: Path, x: np.ndarray, seconds: float = 4.0) -> float:
    """Median int8 / median float time, runs interleaved; as many runs as fit in about `seconds`
    (30-1000: a 1 ms model needs hundreds to rise above this VM's scheduling jitter)."""
    from onnxopt.runtime.timing import median_latencies

    t_f, t_q = median_latencies([str(float_path), str(q_path)], {"x": x}, runs=10, threads=2)
    runs = int(min(1000, max(30, seconds / (t_f + t_q))))
    t_f, t_q = median_latencies([str(float_path), str(q_path)], {"x": x}, runs=runs, threads=2)
    return t_q / t_f


def accuracy(task: str, path: Path, eval_data) -> str:
    run = ocr_data.make_ort_runner(path)
    if task == "rec":
        return f"{100 * ocr_data.rec_accuracy(run, eval_data, ocr_data.rec_character_list()):.1f}%"
    if task == "cls":
        return f"{100 * ocr_data.cls_accuracy(run, eval_data):.1f}%"
    ref = ocr_data.make_ort_runner(model_path("det"))
    m = [ocr_data.det_metrics(ref(x), run(x)) for x in eval_data]
    return f"SQNR {np.mean([d['sqnr_db'] for d in m]):.1f} dB, IoU {np.mean([d['mask_iou'] for d in m]):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="rec,cls,det")
    ap.add_argument("--ort", default="minmax,percentile,entropy")
    ap.add_argument("--calib128", action="store_true", help="also time calibration of 128 rec samples")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap for onnxruntime's quantizers")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per quantizer run")
    args = ap.parse_args()
    rows = [
        "| model | quantizer | accuracy | calib+quantize s | peak RSS MB | int8/float latency | size % |",
        "|---|---|---|---|---|---|---|",
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    os.environ["ONNXOPT_CACHE"] = str(work / "cache")  # cold statistics cache: calibration is timed
    for task in args.models.split(","):
        src = model_path(task)
        calib = work / f"{task}_calib"
        if task == "rec":
            ocr_data.write_calibration_dir(ocr_data.rec_samples(32, 0), calib)
            eval_data = ocr_data.rec_samples(200, 1)
        elif task == "cls":
            ocr_data.write_calibration_dir(ocr_data.cls_samples(32, 0), calib)
            eval_data = ocr_data.cls_samples(300, 1)
        else:
            ocr_data.write_calibration_dir(ocr_data.det_samples(16, 0), calib)
            eval_data = ocr_data.det_samples(20, 1)
        x = eval_data[0][0] if isinstance(eval_data[0], tuple) else eval_data[0]
        rows.append(f"| {task} | float | {accuracy(task, src, eval_data)} | - | - | 1.00 | 100 |")
        for kind in ["onnxopt"] + [k for k in args.ort.split(",") if k]:
            dst = work / f"{task}_{kind}.onnx"
            res = run_quantizer(kind, src, dst, calib, args.timeout, args.mem_cap_gb)
            name = kind if kind == "onnxopt" else f"ORT {kind}"
            if "error" in res:
                rows.append(f"| {task} | {name} | failed: {res['error']} | | | | |")
            else:
                ratio = latency_ratio(src, dst, x)
                size = 100 * dst.stat().st_size / src.stat().st_size
                rows.append(
                    f"| {task} | {name} | {accuracy(task, dst, eval_data)} | {res['seconds']:.1f} | "
                    f"{res['peak_rss_mb']:.0f} | {ratio:.2f} | {size:.0f} |"
                )
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    if args.calib128:
        calib = work / "rec_calib128"
        samples = ocr_data.rec_samples(128, 0, min_width=160)
        ocr_data.write_calibration_dir(samples, calib)
        widths = sorted({int(x.shape[-1]) for x, _ in samples})
        out = [
            "",
            f"Calibration + quantization of 128 rec samples ({len(widths)} widths, {widths[0]}-{widths[-1]} px;"
            " onnxopt with latency/accuracy search off, as quantize_static has none; cold cache):",
            "",
            "| quantizer | wall s | peak RSS MB |",
            "|---|---|---|",
        ]
        for kind in ("onnxopt-calib", "minmax"):
            os.environ["ONNXOPT_CACHE"] = str(work / "cache128")
            res = run_quantizer(
                kind, model_path("rec"), work / f"rec128_{kind}.onnx", calib, args.timeout, args.mem_cap_gb
            )
            out.append(
                f"| {kind} | {res.get('seconds', float('nan')):.1f} | {res.get('peak_rss_mb', float('nan')):.0f} |"
                if "error" not in res
                else f"| {kind} | failed: {res['error']} | |"
            )
            print(out[-1], flush=True)
        text += "\n" + "\n".join(out)
    print(text)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "quantize.md").write_text(
        "# quantize: onnxopt vs onnxruntime quantize_static (this machine, CPU EP, 2 threads)\n\n" + text + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
