"""Structured pruning on PP-OCR: task accuracy against MAC reduction, with and without compensation.

cls: orientation accuracy on rendered text lines (0/180), rec: exact text
accuracy, det: SQNR and text-mask IoU of the probability map against the float
model. Calibration on seed 0, evaluation on seed 1 (fixtures/ocr_data.py).
Each MAC target runs `fold,fuse,prune{macs=...}` with a ridge refit
(compensate=refit), the same selection without compensation (compensate=none),
and plain L1 magnitude without compensation; onnxsim's
`apply_structured_pruning` runs at the sparsity whose parameter count is
closest to the refit model's (bisection). Latency: CPU EP, 2 threads,
interleaved runs, medians, pruned/float ratio. Writes bench/results/prune.md.

    python bench/prune.py [--only cls,rec,det] [--cls-eval 300] [--rec-eval 60] [--det-eval 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from fixtures import ocr_data  # noqa: E402
from fixtures.fetch_models import model_path  # noqa: E402
from onnxopt.analysis.stats import model_stats  # noqa: E402
from onnxopt.runtime.sessions import make_session  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402

LEVELS = (0.1, 0.2, 0.3)
VARIANTS = (
    ("refit", "compensate=refit"),
    ("no compensation", "compensate=none"),
    ("L1, no compensation", "criterion=l1,compensate=none"),
)


def _runner(model: onnx.ModelProto):
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _prune(base: onnx.ModelProto, level: float, extra: str, calib) -> tuple[onnx.ModelProto, dict]:
    res = onnxopt.optimize(base, pipeline=f"prune{{macs={level},{extra}}}", calibration=calib)
    stats = next(p for p in res.report["passes"] if p["name"] == "prune")["stats"]
    return res.model, stats


def _onnxsim_matched(base: onnx.ModelProto, target_params: int):
    """onnxsim's apply_structured_pruning at the sparsity whose parameter count is closest to `target_params`."""
    try:
        import onnxsim

        fn = onnxsim.apply_structured_pruning
    except (ImportError, AttributeError) as exc:
        return None, f"not available ({exc})"
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        pruned = fn(base, sparsity=mid)
        params = model_stats(pruned).parameters
        if best is None or abs(params - target_params) < abs(best[1] - target_params):
            best = (pruned, params, mid)
        if params > target_params:
            lo = mid
        else:
            hi = mid
    return best, ""


def bench_model(name: str, base: onnx.ModelProto, calib, metric, feeds, lines: list[str], runs: int = 50) -> None:
    st0 = model_stats(base)
    lines += [
        f"\n### {name}\n",
        f"float: {metric(base)}; {st0.macs / 1e6:.1f} MMACs, {st0.parameters} parameters\n",
        "| variant | MACs removed (params removed) | metric | pass stats | latency pruned/float |",
        "|---|---|---|---|---|",
    ]
    for level in LEVELS:
        for label, extra in VARIANTS:
            t0 = time.perf_counter()
            model, stats = _prune(base, level, extra, calib)
            secs = time.perf_counter() - t0
            st = model_stats(model)
            assert st.macs == stats["macs_after"], "reported MACs differ from a recount"
            lat = "-"
            if label == "refit":
                float_s, pruned_s = median_latencies([base, model], feeds, runs=runs)
                lat = f"{pruned_s / float_s:.2f} ({pruned_s * 1e3:.2f} / {float_s * 1e3:.2f} ms)"
            lines.append(
                f"| {label} @ {level:.0%} | {stats['mac_reduction']:.1%} ({1 - st.parameters / st0.parameters:.1%}) "
                f"| {metric(model)} | {stats['removed_channels']} channels, "
                f"{stats.get('refits', 0)} refits, {secs:.0f} s | {lat} |"
            )
            print(lines[-1], flush=True)
            if label == "refit":
                best, why = _onnxsim_matched(base, st.parameters)
                if best is None:
                    lines.append(f"| onnxsim apply_structured_pruning @ same params | - | - | {why} | - |")
                else:
                    sim, params, sparsity = best
                    sim_macs = model_stats(sim).macs
                    lines.append(
                        f"| onnxsim apply_structured_pruning @ same params | {1 - sim_macs / st0.macs:.1%} "
                        f"({1 - params / st0.parameters:.1%}) | {metric(sim)} | sparsity={sparsity:.3f} | - |"
                    )
                print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cls-eval", type=int, default=300)
    ap.add_argument("--cls-calib", type=int, default=256)
    ap.add_argument("--rec-eval", type=int, default=60)
    ap.add_argument("--rec-calib", type=int, default=24)
    ap.add_argument("--det-eval", type=int, default=12)
    ap.add_argument("--det-calib", type=int, default=12)
    ap.add_argument("--only", default="cls,rec,det")
    args = ap.parse_args()
    lines = [
        "# bench/prune: structured pruning of PP-OCR without fine-tuning\n",
        f"Calibration seed {ocr_data.CALIB_SEED}, evaluation seed {ocr_data.EVAL_SEED}. "
        "Pipeline `fold,fuse` then `prune{macs=M,...}` "
        "(defaults: max_ratio=0.3, round_to=8, criterion=recon with calibration data). "
        "Latency: CPU EP, 2 threads, 50 interleaved runs (200 for cls), medians.",
    ]
    only = args.only.split(",")

    if "cls" in only:
        base = onnxopt.optimize(str(model_path("cls")), pipeline="fold,fuse").model
        calib = [{"x": x} for x, _ in ocr_data.cls_samples(args.cls_calib, ocr_data.CALIB_SEED)]
        evals = ocr_data.cls_samples(args.cls_eval, ocr_data.EVAL_SEED)

        def cls_metric(m):
            return f"acc {ocr_data.cls_accuracy(_runner(m), evals):.1%}"

        bench_model(
            f"PP-OCR cls ({args.cls_eval} images, {args.cls_calib} calibration)",
            base,
            calib,
            cls_metric,
            {"x": evals[0][0]},
            lines,
            runs=200,
        )

    if "rec" in only:
        base = onnxopt.optimize(str(model_path("rec")), pipeline="fold,fuse").model
        chars = ocr_data.rec_character_list(model_path("rec"))
        calib = [{"x": x} for x, _ in ocr_data.rec_samples(args.rec_calib, ocr_data.CALIB_SEED)]
        evals = ocr_data.rec_samples(args.rec_eval, ocr_data.EVAL_SEED)

        def rec_metric(m):
            return f"text acc {ocr_data.rec_accuracy(_runner(m), evals, chars):.1%}"

        bench_model(
            f"PP-OCRv4 rec ({args.rec_eval} lines, {args.rec_calib} calibration)",
            base,
            calib,
            rec_metric,
            {"x": evals[0][0]},
            lines,
        )

    if "det" in only:
        base = onnxopt.optimize(str(model_path("det")), pipeline="fold,fuse").model
        calib = [{"x": x} for x in ocr_data.det_samples(args.det_calib, ocr_data.CALIB_SEED)]
        evals = ocr_data.det_samples(args.det_eval, ocr_data.EVAL_SEED)
        ref_run = _runner(base)
        refs = [ref_run(x) for x in evals]

        def det_metric(m):
            run = _runner(m)
            ms = [ocr_data.det_metrics(r, run(x)) for r, x in zip(refs, evals)]
            return (
                f"SQNR {np.median([d['sqnr_db'] for d in ms]):.1f} dB, IoU {np.mean([d['mask_iou'] for d in ms]):.3f}"
            )

        bench_model(
            f"PP-OCRv4 det ({args.det_eval} pages 320x320, {args.det_calib} calibration)",
            base,
            calib,
            det_metric,
            {"x": evals[0]},
            lines,
        )

    out = ROOT / "bench" / "results" / "prune.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
