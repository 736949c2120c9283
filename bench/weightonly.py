"""Benchmark: onnxopt's `weightonly` pass against onnxruntime's MatMulNBitsQuantizer on MiniLM-L3 and PP-OCRv4 rec.

Per model and configuration: file size (and its share of float), the task metric (MiniLM: sentence-embedding
cosine and nearest-neighbour agreement vs float, as bench/transformers.py; rec: exact-match text accuracy on
rendered lines, as bench/quantize.py), CPU-EP latency (medians of interleaved runs, ratio to float in the same
run) and quantization time. onnxruntime's quantizer runs in the same process with its default asymmetric RTN
(`DefaultWeightOnlyQuantConfig`, MatMul and Gather at 4 bits; Gather is int4-only there). onnxruntime's GPTQ
and HQQ paths need neural-compressor / torch and are not run here. Our pass runs with `timing=false` (size
first: every layer quantized) and with the default `timing=true` (never slower per layer on this CPU).

    python bench/weightonly.py [--models minilm,rec] [--runs 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import ocr_data, zoo_data  # noqa: E402
from onnxopt.api import optimize  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402

MODELS = ROOT / ".fixtures" / "models"


def ort_rtn(model: onnx.ModelProto, bits: int, block: int, gather: bool) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer, default RTN (asymmetric), MatMul (and Gather at 4 bits: its
    Gather path forces opset 21 onto the model, which breaks rec's opset-12 ReduceMean, so only where
    the model has an embedding table)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = ("MatMul", "Gather") if bits == 4 and gather else ("MatMul",)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    own = onnx.ModelProto()
    own.CopyFrom(model)  # the quantizer edits the model it is given in place
    q = MatMulNBitsQuantizer(own, bits=bits, block_size=block, op_types_to_quantize=ops)
    q.process()
    return q.model.model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class MiniLM:
    name = "minilm"

    def __init__(self) -> None:
        self.float = onnx.load(MODELS / "minilm.onnx")
        self.calib = zoo_data.minilm_feeds(64, 0, batch=16)
        self.eval = zoo_data.minilm_feeds(128, 1, batch=32)
        self.ref = zoo_data.minilm_embed(self._runner(self.float), self.eval)
        self.timed = self.eval[0]

    def _runner(self, model: onnx.ModelProto):
        s = session(model)
        return lambda f: s.run(None, f)

    def metric(self, model: onnx.ModelProto) -> str:
        m = zoo_data.embedding_metrics(self.ref, zoo_data.minilm_embed(self._runner(model), self.eval))
        return f"cos {m['cos_mean']:.4f} (min {m['cos_min']:.3f}), nn {m['nn_agreement']:.3f}"


class Rec:
    name = "rec"

    def __init__(self) -> None:
        # constants as initializers (onnxruntime's quantizer reads initializers only): the same float base for all
        self.float = optimize(str(MODELS / "rec.onnx"), "fold").model
        samples = ocr_data.rec_samples(32, 0)
        self.calib = [{"x": x} for x, _ in samples]
        self.eval = ocr_data.rec_samples(150, 1)
        self.chars = ocr_data.rec_character_list()
        self.timed = {"x": samples[0][0]}

    def metric(self, model: onnx.ModelProto) -> str:
        s = session(model)
        return f"acc {100 * ocr_data.rec_accuracy(lambda x: s.run(None, {'x': x})[0], self.eval, self.chars):.1f}%"


def configs(bits: int, block: int) -> list[tuple[str, str]]:
    """(label, recipe): 'ort' for onnxruntime's RTN, else our pipeline text."""
    ours = f"weightonly{{bits={bits},block={block}"
    return [
        (f"ort rtn int{bits} b{block}", f"ort:{bits}:{block}"),
        (f"onnxopt rtn int{bits} b{block}", ours + ",rounding=rtn,timing=false}"),
        (f"onnxopt gptq int{bits} b{block}", ours + ",rounding=gptq,timing=false}"),
        (f"onnxopt awq int{bits} b{block}", ours + ",rounding=awq,timing=false}"),
        (f"onnxopt gptq int{bits} b{block} timed", ours + ",rounding=gptq}"),
    ]


def build(task, recipe: str) -> tuple[onnx.ModelProto, float, str]:
    t0 = time.perf_counter()
    if recipe.startswith("ort:"):
        _, bits, block = recipe.split(":")
        model = ort_rtn(task.float, int(bits), int(block), task.name == "minilm")
        note = ""
    else:
        res = optimize(task.float, recipe, calibration=task.calib)
        model = res.model
        st = next(p for p in res.report["passes"] if p["name"] == "weightonly")["stats"]
        note = f"{st.get('int4', 0)} int4 / {st.get('int8', 0)} int8 layers, {st.get('tables', 0)} tables"
    return model, time.perf_counter() - t0, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,rec")
    ap.add_argument("--runs", type=int, default=3, help="interleaved latency rounds (medians of medians)")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--blocks", default="32,128")
    args = ap.parse_args()
    tasks = [{"minilm": MiniLM, "rec": Rec}[m]() for m in args.models.split(",")]
    for task in tasks:
        float_size = len(task.float.SerializeToString())
        rows = [("float", task.float, 0.0, "")]
        for bits in map(int, args.bits.split(",")):
            for block in map(int, args.blocks.split(",")):
                for label, recipe in configs(bits, block):
                    if bits == 8 and label.endswith("timed"):
                        continue
                    try:
                        model, secs, note = build(task, recipe)
                    except Exception as exc:  # noqa: BLE001 - a failing baseline is a row of the table
                        print(f"| {task.name} | {label} | failed: {str(exc).splitlines()[0][:100]} |", flush=True)
                        continue
                    rows.append((label, model, secs, note))
        with tempfile.TemporaryDirectory():
            lat = [[] for _ in rows]
            for _ in range(args.runs):
                for i, t in enumerate(median_latencies([m for _, m, _, _ in rows], task.timed, runs=10)):
                    lat[i].append(t)
        med = [statistics.median(x) for x in lat]
        print(f"\n### {task.name}\n")
        print("| config | size | of float | metric | CPU ms | vs float | quantize s | notes |")
        print("|---|---|---|---|---|---|---|---|")
        for (label, model, secs, note), t in zip(rows, med):
            size = len(model.SerializeToString())
            print(
                f"| {label} | {size / 1e6:.2f} MB | {size / float_size:.3f} | {task.metric(model)} | "
                f"{1000 * t:.1f} | {t / med[0]:.2f}x | {secs:.1f} | {note} |",
                flush=True,
            )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
