"""Benchmark: the `fp16` pass on every zoo model and PP-OCR det/rec/cls, on the CPU and OpenVINO EPs.

For each model: `onnxopt.optimize(M, "fp16", calibration=..., target="openvino")` (calibration data
from `fixtures.zoo_data`, seed 0), then, on real inputs (seed 1): outputs of the fp16 model against
the float model on the CPU EP and on the OpenVINO EP (there also against the float model on OpenVINO, which
separates the float16 error from the EP's own; worst cosine, SQNR, NaN/Inf, judged with the
`fp16` tolerance class of `onnxopt.verify.tolerance`), the task metric of `fixtures.zoo_data.TASKS`
(CPU EP), the file size ratio, and latency fp16 / float on both EPs: CPU with
`onnxopt.runtime.timing.median_latencies` (interleaved, medians, 2 threads), OpenVINO with the EP
worker (`onnxopt.verify.ep.runner`), float and fp16 workers alternating, median of the per-round
medians. It also runs the float model with OpenVINO's `precision` option FP16 to show what the
plugin does with float16 inference precision on this CPU.

    python bench/fp16.py [--models cls,rec] [--quick]

Writes bench/results/fp16.md (or --out). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import zoo_data  # noqa: E402
from onnxopt import optimize  # noqa: E402
from onnxopt.data.wheel_models import ZOO  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402
from onnxopt.verify.ep.envs import resolve_interpreter  # noqa: E402
from onnxopt.verify.ep.runner import WorkerJob, run_worker, write_inputs  # noqa: E402
from onnxopt.verify.tolerance import Tolerance  # noqa: E402

MODELS = (*ZOO, "det", "rec", "cls")
# samples per model: (calibration, task metric, output checks)
SAMPLES = {"layout_cdla": (4, 8, 2), "det": (4, 8, 2), "rec": (16, 50, 4), "cls": (16, 100, 4)}
DEFAULT = (16, 100, 4)
OV = "OpenVINOExecutionProvider"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compare(refs: list[list[np.ndarray]], cands: list[list[np.ndarray]]) -> dict[str, float]:
    """Worst cosine and SQNR over float outputs and samples, and the count of NaN/Inf in the candidate."""
    cos, sqnr, bad = 1.0, math.inf, 0
    for ref, cand in zip(refs, cands):
        for a, b in zip(ref, cand):
            if np.asarray(a).dtype.kind != "f":
                continue
            a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            bad += int(np.size(b64) - np.count_nonzero(np.isfinite(b64)))
            b64 = np.nan_to_num(b64)
            na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
            cos = min(cos, 1.0 if na == nb == 0 else float(a64 @ b64 / max(na * nb, 1e-30)))
            noise = float(np.sum((a64 - b64) ** 2))
            sqnr = min(sqnr, math.inf if noise == 0 else 10 * math.log10(max(float(a64 @ a64), 1e-30) / noise))
    return {"cos": cos, "sqnr": sqnr, "nonfinite": bad}


def verdict(m: dict[str, float]) -> str:
    """ok / FAIL against the fp16 tolerance's cosine and SQNR limits, and no NaN/Inf."""
    t = Tolerance.FP16.pass_
    ok = m["nonfinite"] == 0 and m["cos"] >= (t.min_cosine or 0) and m["sqnr"] >= (t.min_sqnr_db or -math.inf)
    return "ok" if ok else "FAIL"


def ov_run(python: str, model: Path, feeds: list[dict], inputs: Path, runs: int, options: dict) -> tuple:
    """(outputs per sample, latency ms list, error) of `model` on the OpenVINO EP worker."""
    names = list(feeds[0])
    job = WorkerJob(str(model), OV, provider_options=options, intra_op_threads=2, warmup=2, runs=runs)
    res = run_worker(python, job, inputs, names, len(feeds), timeout=600)
    if not res.ok:
        tail = [ln for ln in res.stderr_tail.splitlines() if "rror" in ln or "ERROR" in ln][-1:]
        return None, [], f"{res.stage}: {res.error[:80]} {' '.join(tail)[-200:]}"
    return [list(o.values()) for o in res.outputs], res.latency_ms, ""


def bench_model(name: str, work: Path, quick: bool, ov_python: str | None) -> dict:
    src = zoo_data.fixture_path(name)
    n_cal, n_eval, n_check = SAMPLES.get(name, DEFAULT)
    if quick:
        n_cal, n_eval, n_check = max(4, n_cal // 4), max(8, n_eval // 4), min(2, n_check)
    task = zoo_data.TASKS[name]
    row: dict = {"model": name}
    calib = task.feeds(n_cal, zoo_data.CALIB_SEED, zoo_data.MODELS)
    check = task.feeds(n_check, zoo_data.EVAL_SEED, zoo_data.MODELS)[:n_check]
    log(f"{name}: fp16 pass ({n_cal} calibration samples)")
    t0 = time.perf_counter()
    res = optimize(str(src), "fp16", calibration=calib, target="openvino")
    row["seconds"] = time.perf_counter() - t0
    rec = res.report["passes"][0]
    row["stats"] = rec["stats"]
    row["kept"] = [s["reason"].split(":")[0].split(" ")[0] for s in rec["skipped"]]
    row["reason"] = rec.get("reason", "")
    out = work / f"{name}.fp16.onnx"
    onnx.save(res.model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    row["size"] = out.stat().st_size / src.stat().st_size
    ref_cpu, cand_cpu = zoo_data.ort_runner(src), zoo_data.ort_runner(out)
    refs = [ref_cpu(f) for f in check]
    row["cpu"] = compare(refs, [cand_cpu(f) for f in check])
    log(f"{name}: task metric")
    row["metric"] = task.metric(src, out, n_eval, zoo_data.EVAL_SEED, zoo_data.MODELS)
    log(f"{name}: CPU latency")
    t_ref, t_cand = median_latencies([str(src), str(out)], check[0], runs=5 if quick else 15, warmup=2)
    row["cpu_latency"] = t_cand / t_ref
    if ov_python:
        bench_openvino(row, ov_python, src, out, check, refs, work, quick)
    return row


def bench_openvino(
    row: dict, python: str, src: Path, out: Path, check: list, refs: list, work: Path, quick: bool
) -> None:
    """OpenVINO EP: fp16 outputs against float (CPU EP), latency interleaved, and precision=FP16."""
    inputs = work / f"{row['model']}.inputs.npz"
    write_inputs(inputs, check, list(check[0]))
    runs, rounds = (5, 2) if quick else (10, 3)
    lat: dict[str, list[float]] = {"float": [], "fp16": []}
    outs: dict[str, list | None] = {}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for key, path in (("float", src), ("fp16", out)) if r % 2 == 0 else (("fp16", out), ("float", src)):
            if key in errors:
                continue
            log(f"{row['model']}: OpenVINO {key} round {r + 1}/{rounds}")
            got, ms, err = ov_run(python, path, check, inputs, runs, {})
            if err:
                errors[key] = err
                continue
            outs.setdefault(key, got)
            lat[key].append(float(np.median(ms)))
    if errors:
        row["ov_error"] = "; ".join(f"{k} model fails: {e}" for k, e in errors.items())
    if "fp16" in outs:
        row["ov"] = compare(refs, outs["fp16"])
    if "float" in outs:
        row["ov_float"] = compare(refs, outs["float"])
    if "float" in outs and "fp16" in outs:
        row["ov_vs_ov"] = compare(outs["float"], outs["fp16"])
    if lat["fp16"] and lat["float"]:
        row["ov_latency"] = float(np.median(lat["fp16"]) / np.median(lat["float"]))
    got, _, err = ov_run(python, src, check, inputs, 0, {"precision": "FP16"})
    row["ov_precision_fp16"] = err or f"runs; float model vs CPU float: cos {compare(refs, got)['cos']:.6f}"


def _f(x: float, spec: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | fp16 nodes / kept float32 (range, error, weight, no kernel) / casts | size "
        "| CPU EP: cos, SQNR, NaN/Inf | OpenVINO EP (vs float on CPU EP): cos, SQNR, NaN/Inf | task metric "
        "| latency fp16/float CPU | latency fp16/float OpenVINO "
        "| pass time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} | | | | | | | |")
            continue
        s = r["stats"]
        k = r["kept"]
        kept = (
            f"{s.get('kept_float32', 0)} ({k.count('range')}, {k.count('error')}, {k.count('weight')}, {k.count('no')})"
        )
        head = zoo_data.TASKS[r["model"]].headline
        metric = f"{head} {r['metric'].get(head, float('nan')):.4f}"
        cpu, ov = r["cpu"], r.get("ov")
        ov_text = r.get("ov_error", "")[:160]
        if ov:
            ov_text = f"{ov['cos']:.6f}, {_f(ov['sqnr'], '.1f')} dB, {ov['nonfinite']} {verdict(ov)} {ov_text}"
        if r.get("ov_vs_ov"):
            oo = r["ov_vs_ov"]
            ov_text += f" (vs float on OpenVINO: {oo['cos']:.6f}, {_f(oo['sqnr'], '.1f')} dB {verdict(oo)})"
        lines.append(
            f"| {r['model']} | {s.get('fp16_nodes', 0)} / {kept} / {s.get('casts_inserted', 0)} | {_f(r['size'])}x "
            f"| {cpu['cos']:.6f}, {_f(cpu['sqnr'], '.1f')} dB, {cpu['nonfinite']} {verdict(cpu)} | {ov_text} "
            f"| {metric} | {_f(r['cpu_latency'])}x | {_f(r.get('ov_latency', math.nan))}x | {r['seconds']:.0f}s |"
        )
    lines.append("")
    for r in rows:
        if "ov_precision_fp16" in r:
            lines.append(f"- {r['model']}: OpenVINO `precision=FP16` on the float model: {r['ov_precision_fp16']}")
        if r.get("ov_float"):
            lines.append(f"- {r['model']}: float model on OpenVINO vs CPU EP: cos {r['ov_float']['cos']:.6f}")
        if r.get("ov_error"):
            lines.append(f"- {r['model']}: OpenVINO: {r['ov_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fp16.md"))
    args = ap.parse_args(argv)
    ov = resolve_interpreter("openvino")
    ov_python = ov.python if ov.available else None
    if not ov_python:
        log(f"OpenVINO EP unavailable: {ov.reason}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-fp16-") as tmp:
        for name in args.models.split(","):
            try:
                rows.append(bench_model(name, Path(tmp), args.quick, ov_python))
            except Exception as exc:  # noqa: BLE001  a model that fails is a row of the table
                log(f"{name}: {type(exc).__name__}: {exc}")
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
    header = f"`python bench/fp16.py{' --quick' if args.quick else ''} --models {args.models}`"
    text = markdown(rows, header)
    print(text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
