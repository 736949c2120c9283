"""bench/validate: onnxopt's results on PP-OCR det/rec/cls validated on the CPU, OpenVINO and CUDA EPs.

For each model and pipeline: optimize (calibration on rendered text, seed 0),
then `onnxopt.verify.validate.validate` on rendered evaluation inputs (seed 1) on
every EP: worst SQNR/cosine of the end-to-end check, node placement read back
from onnxruntime, and the CAND/REF latency ratio. EPs that cannot run here (no
GPU for CUDA) are listed as skipped with the reason.

    python bench/validate.py [--eps cpu,openvino,cuda] [--models det,rec,cls] [--samples 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from fixtures import ocr_data  # noqa: E402
from fixtures.fetch_models import model_path  # noqa: E402
from onnxopt.framework.pipeline import build_pipeline  # noqa: E402
from onnxopt.report.tables import table  # noqa: E402
from onnxopt.verify.tolerance import ThresholdSet, loosest  # noqa: E402
from onnxopt.verify.validate import validate  # noqa: E402

PIPELINES = {
    "det": ["fold,fuse", "fold,quantize", "fold,fuse,prune{macs=0.1}"],
    "rec": ["fold,fuse", "fold,quantize", "fold,lowrank{params=0.3}"],
    "cls": ["fold,fuse", "fold,quantize", "fold,fuse,prune{macs=0.2}"],
}


def samples(model: str, n: int, seed: int) -> list:
    """Rendered inputs for `model` in the calibration format (list of {"x": array})."""
    if model == "rec":
        return [x for x, _ in ocr_data.rec_samples(n, seed)]
    if model == "cls":
        return [x for x, _ in ocr_data.cls_samples(n, seed)]
    return ocr_data.det_samples(n, seed, size=(320, 320))


def run(models: list[str], eps: list[str], n: int, work: Path) -> list[list]:
    rows = []
    for model in models:
        src = model_path(model)
        calib, evald = work / f"{model}-calib", work / f"{model}-eval"
        ocr_data.write_calibration_dir(samples(model, 32, 0), calib)
        ocr_data.write_calibration_dir(samples(model, n, 1), evald)
        for pipeline in PIPELINES[model]:
            print(f"{model}: {pipeline}", flush=True)
            tol = loosest([p.tolerance for p in build_pipeline(pipeline)])
            try:
                res = onnxopt.optimize(src, pipeline=pipeline, calibration=calib)
            except Exception as exc:  # noqa: BLE001  a pass not able to run is a result of the bench
                rows.append([model, pipeline, "-", f"optimize failed: {str(exc)[:60]}", "-", "-", "-", "-"])
                continue
            cand = work / f"{model}-{PIPELINES[model].index(pipeline)}.onnx"
            res.save(cand)
            rep = validate(
                str(src),
                str(cand),
                eps,
                data=str(evald),
                samples=n,
                thresholds=ThresholdSet.for_tolerance(tol),
                threads=2,
                runs=20,
            )
            print(rep.format_table(), flush=True)
            for e in rep.eps:
                e2e = [c for c in e.checks if c.check == "e2e"]
                sqnr = min((c.sqnr_db for c in e2e if c.sqnr_db is not None), default=None)
                cos = min((c.cosine for c in e2e if c.cosine is not None), default=None)
                place = e.placement.summary().split(" [")[0] if e.placement else "-"
                lat = f"{e.latency.ratio:.2f}" if e.latency and e.latency.ratio else "-"
                status = e.status if e.status != "skipped" else f"skipped: {e.reason[:70]}"
                rows.append(
                    [
                        model,
                        pipeline,
                        e.ep,
                        status,
                        place,
                        "-" if sqnr is None else ("inf" if sqnr == float("inf") else f"{sqnr:.1f}"),
                        "-" if cos is None else f"{cos:.5f}",
                        lat,
                    ]
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", default="cpu,openvino,cuda")
    ap.add_argument("--models", default="det,rec,cls")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "validate.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-validate-") as d:
        rows = run(args.models.split(","), args.eps.split(","), args.samples, Path(d))
    text = (
        "Each optimized model validated against its original on rendered evaluation inputs "
        f"({args.samples} samples, seed 1; calibration seed 0). SQNR and cosine: worst output of the "
        "end-to-end check (CAND on the EP vs REF on the CPU EP). Latency: CAND/REF median on that EP "
        "(2 threads, 20 runs).\n\n"
        + table(
            ["model", "pipeline", "EP", "status", "placement", "e2e SQNR dB", "e2e cosine", "latency CAND/REF"], rows
        )
        + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# bench/validate\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
