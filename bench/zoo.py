"""Benchmark: every zoo model (with PP-OCR det/rec/cls) x pipelines, through the CLI, as a new user would.

For each model and pipeline: `onnxopt optimize M -o OUT -p PIPELINE --calib DIR --report R.json`
(calibration data from `fixtures.zoo_data`, seed 0), then, checked here independently of
onnxopt's own checks: the exit code; `onnx.checker.check_model(full_check=True)`; the whole
signature (input and output names, dtypes, dimensions with their symbolic names) equal to the
original's; outputs against the original on real inputs (seed 1); the task metric of
`fixtures.zoo_data.TASKS`; file size ratio; CPU latency ratio (`onnxopt.runtime.timing.median_latencies`,
runs interleaved, medians, 2 threads); `onnxopt validate --ep cpu,openvino` verdict and node
placement; node count against onnxslim's on the same model (dynamic shapes).

Pipelines (aliases): fuse = `fold,fuse`; quantize = `fold,quantize`; prune =
`fold,fuse,prune{macs=0.2}` (models with Conv/Gemm/MatMul weights); lowrank = `fold,lowrank{params=0.3}`
(models with Gemm/MatMul weights). A pipeline that does not apply to a model is listed as n/a.

    python bench/zoo.py [--models magika,minilm] [--pipelines fuse,quantize] [--quick] [--no-validate]

Writes bench/results/zoo.md (or --out). Progress goes to stderr, one line per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import zoo_data  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402

PIPELINES = {
    "fuse": "fold,fuse",
    "quantize": "fold,quantize",
    "prune": "fold,fuse,prune{macs=0.2}",
    "lowrank": "fold,lowrank{params=0.3}",
}
MODELS = (
    "magika",
    "layout_cdla",
    "minilm",
    "romanizer_encoder",
    "romanizer_decoder",
    "tashkeel_bilstm_int8",
    "det",
    "rec",
    "cls",
)
# samples per model: (calibration, evaluation for the task metric, feeds for output/validate checks)
SAMPLES = {
    "magika": (64, 256, 2),
    "layout_cdla": (8, 8, 2),
    "minilm": (64, 256, 2),
    "romanizer_encoder": (64, 256, 2),
    "romanizer_decoder": (64, 256, 4),
    "tashkeel_bilstm_int8": (64, 200, 4),
    "det": (8, 16, 2),
    "rec": (32, 100, 4),
    "cls": (32, 200, 4),
}
QUICK = {k: (max(4, c // 4), max(8, e // 8), min(2, v)) for k, (c, e, v) in SAMPLES.items()}
EXACT_PIPELINES = ("fuse",)  # outputs must match the original to float rounding


def log(msg: str) -> None:
    """One progress line on stderr, flushed (also when stderr is not a terminal)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def applicable(model: onnx.ModelProto, pipeline: str) -> str | None:
    """Why `pipeline` does not apply to `model` (None when it does)."""
    weights = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }  # Paddle exports: Constant nodes
    ops = {(n.op_type, any(i in weights for i in n.input[1:2])) for n in model.graph.node}
    if pipeline == "prune" and not any(op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and w for op, w in ops):
        return "no Conv/Gemm/MatMul weights"
    if pipeline == "lowrank" and not any(op in ("Gemm", "MatMul") and w for op, w in ops):
        return "no Gemm/MatMul weights"
    return None


@dataclass
class Row:
    """One model x pipeline result."""

    model: str
    pipeline: str
    rc: int | None = None
    seconds: float = 0.0
    changed: str = ""
    error: str = ""
    checker: str = ""
    signature: str = ""
    outputs: str = ""
    metric: dict = field(default_factory=dict)
    size_ratio: float = math.nan
    latency_ratio: float = math.nan
    validate: str = ""
    placement: str = ""
    nodes: tuple[int, int, int | None] = (0, 0, None)
    cost_s: float = 0.0


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def optimize(src: Path, dst: Path, pipeline: str, calib: Path, report: Path, timeout: int) -> tuple[int, str, float]:
    """Run the CLI; (exit code, last line of stderr/stdout, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "onnxopt.cli",
        "optimize",
        str(src),
        "-o",
        str(dst),
        "-p",
        pipeline,
        "--calib",
        str(calib),
        "--report",
        str(report),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return -1, f"timeout after {timeout}s", time.perf_counter() - t0
    return proc.returncode, _last_line(proc.stderr) or _last_line(proc.stdout), time.perf_counter() - t0


def compare_outputs(ref: Path, cand: Path, feeds: list[dict]) -> tuple[str, bool]:
    """Worst max-abs error and cosine over every output and feed; (text, exact-to-rounding)."""
    r, c = zoo_data.ort_runner(ref), zoo_data.ort_runner(cand)
    worst_abs, worst_cos, exact, mismatch = 0.0, 1.0, True, ""
    for f in feeds:
        for i, (a, b) in enumerate(zip(r(f), c(f))):
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"output {i}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}", False
            if a.dtype.kind not in "fc":
                if not np.array_equal(a, b):
                    mismatch = f"output {i} differs"
                continue
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            worst_abs = max(worst_abs, float(np.max(np.abs(a64 - b64))) if a64.size else 0.0)
            na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
            cos = 1.0 if na == nb == 0 else float(a64 @ b64 / max(na * nb, 1e-30))
            worst_cos = min(worst_cos, cos)
            exact &= bool(np.allclose(b64, a64, rtol=1e-4, atol=1e-5 + 1e-4 * float(np.max(np.abs(a64), initial=0))))
    if mismatch:
        return mismatch, False
    return f"max_abs {worst_abs:.2g}, cos {worst_cos:.6f}", exact


def onnxslim_nodes(src: Path, timeout: int) -> int | None:
    """Nodes onnxslim leaves (dynamic shapes), in a subprocess; None when it fails."""
    code = "import sys, onnxslim; m = onnxslim.slim(sys.argv[1]); print(len(m.graph.node))"
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=timeout)
        return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def validate(ref: Path, cand: Path, data: Path, report: Path, eps: str, timeout: int) -> tuple[str, str]:
    """`onnxopt validate` verdict (exit code and result line) and per-EP placement."""
    cmd = [
        sys.executable,
        "-m",
        "onnxopt.cli",
        "validate",
        str(ref),
        str(cand),
        "--ep",
        eps,
        "--data",
        str(data),
        "--samples",
        "2",
        "--runs",
        "3",
        "--warmup",
        "1",
        "--report",
        str(report),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout}s", ""
    verdict = next(
        (ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("result:")),
        _last_line(proc.stderr) or "?",
    )
    placement = []
    if report.exists():
        rep = json.loads(report.read_text())
        for ep in rep.get("eps", []):
            p = ep.get("placement") or {}
            where = f"{p.get('on_target', '?')}/{p.get('total', '?')}" if p else ep.get("reason", "")[:40]
            placement.append(f"{ep['ep']} {ep.get('status', '?')} {where}")
    return f"rc {proc.returncode}: {verdict}", "; ".join(placement)


def strict_signature(ref: onnx.ModelProto, cand: onnx.ModelProto) -> str:
    """'equal' or the first difference (names, order, dtypes, every dimension incl. symbolic names)."""
    diff = zoo_data.signature_diff(ref, cand)
    return "equal" if not diff else diff[0][:100]


def bench_model(
    name: str, pipelines: list[str], work: Path, quick: bool, eps: str, do_validate: bool, timeout: int
) -> list[Row]:
    """Every pipeline on one model."""
    t_model = time.perf_counter()
    src = zoo_data.fixture_path(name)
    if not src.exists():
        log(f"{name}: {src} missing; run python fixtures/fetch_models.py")
        return [Row(name, p, error="model missing") for p in pipelines]
    n_cal, n_eval, n_check = (QUICK if quick else SAMPLES)[name]
    task = zoo_data.TASKS[name]
    original = onnx.load(str(src))
    mdir = work / name
    calib, check = mdir / "calib", mdir / "check"
    log(f"{name}: writing {n_cal} calibration and {n_check} check samples")
    zoo_data.write_feeds(task.feeds(n_cal, zoo_data.CALIB_SEED, zoo_data.MODELS), calib)
    check_feeds = task.feeds(max(n_check, 1), zoo_data.EVAL_SEED, zoo_data.MODELS)[:n_check]
    zoo_data.write_feeds(check_feeds, check)
    log(f"{name}: onnxslim")
    slim = onnxslim_nodes(src, timeout)
    rows = []
    for alias in pipelines:
        t_row = time.perf_counter()
        pipeline = PIPELINES[alias]
        row = Row(name, alias)
        why = applicable(original, alias)
        if why:
            row.error = f"n/a ({why})"
            rows.append(row)
            continue
        out, rep = mdir / f"{alias}.onnx", mdir / f"{alias}.report.json"
        log(f"{name} x {pipeline}: optimize")
        row.rc, msg, row.seconds = optimize(src, out, pipeline, calib, rep, timeout)
        if rep.exists():
            report = json.loads(rep.read_text())
            passes = report.get("passes", [])
            row.changed = ",".join(p["name"] for p in passes if p.get("changed")) or "none"
            reasons = [f"{p['name']}: {p['reason']}" for p in passes if not p.get("changed") and p.get("reason")]
            if reasons:
                row.changed += f" ({'; '.join(reasons)[:70]})"
        if row.rc != 0 or not out.exists():
            row.error = msg or f"exit {row.rc}, no output"
            log(f"{name} x {pipeline}: exit {row.rc}: {msg}")
            row.cost_s = time.perf_counter() - t_row
            rows.append(row)
            continue
        cand = onnx.load(str(out))
        try:
            onnx.checker.check_model(cand, full_check=True)
            row.checker = "ok"
        except Exception as exc:  # noqa: BLE001  the checker's failure, whatever its type, is the finding itself
            row.checker = f"FAIL: {str(exc).splitlines()[0][:80]}"
        row.signature = strict_signature(original, cand)
        row.nodes = (len(original.graph.node), len(cand.graph.node), slim)
        row.size_ratio = out.stat().st_size / src.stat().st_size
        try:
            log(f"{name} x {pipeline}: outputs and task metric")
            text, exact = compare_outputs(src, out, check_feeds)
            row.outputs = text + ("" if exact or alias not in EXACT_PIPELINES else " NOT EXACT")
            row.metric = task.metric(src, out, n_eval, zoo_data.EVAL_SEED, zoo_data.MODELS)
            log(f"{name} x {pipeline}: latency")
            t_ref, t_cand = median_latencies([str(src), str(out)], check_feeds[0], runs=5 if quick else 15, warmup=2)
            row.latency_ratio = t_cand / t_ref
        except Exception as exc:  # noqa: BLE001  a candidate that does not run is a result
            row.outputs = row.outputs or f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if do_validate:
            log(f"{name} x {pipeline}: validate --ep {eps}")
            row.validate, row.placement = validate(src, out, check, mdir / f"{alias}.validate.json", eps, timeout)
        row.cost_s = time.perf_counter() - t_row
        log(
            f"{name} x {pipeline}: done in {row.cost_s:.0f}s; {task.headline}="
            f"{row.metric.get(task.headline, float('nan')):.4f}"
        )
        rows.append(row)
    log(f"{name}: {time.perf_counter() - t_model:.0f}s for {len(pipelines)} pipelines")
    return rows


def _fmt(x: float, spec: str = ".2f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[Row], header: str) -> str:
    """The results table (and one line per failure)."""
    lines = [
        header,
        "",
        "| model | pipeline | exit | changed | checker | signature | outputs vs original | task metric "
        "| size | CPU latency | validate cpu,openvino | placement | nodes (orig / ours / onnxslim) | cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.rc is None:
            lines.append(f"| {r.model} | {PIPELINES.get(r.pipeline, r.pipeline)} | | {r.error} | | | | | | | | | | |")
            continue
        head = zoo_data.TASKS[r.model].headline
        metric = f"{head} {r.metric[head]:.4f}" if head in r.metric else ""
        extra = {k: v for k, v in r.metric.items() if k != head and not k.endswith(("s", "chars"))}
        if extra:
            metric += " (" + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()) + ")"
        nodes = f"{r.nodes[0]} / {r.nodes[1]} / {r.nodes[2] if r.nodes[2] is not None else 'failed'}"
        lines.append(
            f"| {r.model} | `{PIPELINES[r.pipeline]}` | {r.rc} | {r.changed or r.error} | {r.checker} | {r.signature} "
            f"| {r.outputs} | {metric} | {_fmt(r.size_ratio)}x | {_fmt(r.latency_ratio)}x | {r.validate} "
            f"| {r.placement} | {nodes if r.rc == 0 else ''} | {r.cost_s:.0f}s |"
        )
    failures = [r for r in rows if r.rc not in (None, 0)]
    if failures:
        lines += ["", "Failures:", ""] + [
            f"- {r.model} x `{PIPELINES[r.pipeline]}`: exit {r.rc}: {r.error}" for r in failures
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated aliases: {','.join(PIPELINES)}")
    ap.add_argument("--quick", action="store_true", help="fewer samples and timing runs")
    ap.add_argument("--no-validate", action="store_true", help="skip `onnxopt validate`")
    ap.add_argument("--eps", default="cpu,openvino")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per CLI command")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zoo.md")
    ap.add_argument("--work-dir", type=Path, help="keep outputs here (default: a temporary directory)")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    pipelines = [p for p in args.pipelines.split(",") if p]
    bad = [m for m in models if m not in MODELS] + [p for p in pipelines if p not in PIPELINES]
    if bad:
        ap.error(f"unknown models/pipelines: {', '.join(bad)}")
    os.environ.setdefault("ONNXOPT_PROGRESS", "0")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-") as tmp:
        work = args.work_dir or Path(tmp)
        rows = [
            r
            for m in models
            for r in bench_model(m, pipelines, work, args.quick, args.eps, not args.no_validate, args.timeout)
        ]
    command = " ".join(
        ["python bench/zoo.py", f"--models {','.join(models)}", f"--pipelines {','.join(pipelines)}"]
        + ["--quick"] * args.quick
        + ["--no-validate"] * args.no_validate
    )
    header = (
        f"# bench/zoo\n\n`{command}` on this "
        f"machine ({os.cpu_count()} cores), {time.perf_counter() - t0:.0f}s. Outputs on real inputs "
        "(fixtures/zoo_data.py, seed 1; calibration seed 0); 'NOT EXACT' marks a fold,fuse output outside "
        "rtol 1e-4. Size and CPU latency are candidate/original. Cost: seconds for the row (optimize + "
        "checks + metric + latency + validate)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, header))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
