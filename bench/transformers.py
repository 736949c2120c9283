"""Benchmark (issue #16): onnxopt on a transformer, paraphrase-MiniLM-L3, against onnxruntime's own recipes.

Model: ``.fixtures/models/minilm.onnx`` (sentence-transformers export, opset 17, inputs
``input_ids``/``attention_mask`` int64 [batch, seq], four outputs: the input ids and mask passed
through, the token embeddings [b, s, 384] and the mean-pooled sentence embedding [b, 384]).

Variants, all produced in the same run from the same file, each in its own subprocess (a tool that
crashes, even in native code, is a row saying so; the time to produce is measured in the child
around load + transform + save):

* ``float``: the original;
* ``onnxopt fold,fuse`` (``onnxopt.optimize(..., target="cpu")``, as ``onnxopt optimize -p fold,fuse
  --target cpu``);
* ``onnxopt fold,fuse,quantize`` with calibration data, for ``quantize`` (default, VNNI detected
  here), ``quantize{vnni=no}`` and ``quantize{vnni=yes}``;
* ``ort quantize_dynamic`` (per_channel=True, QInt8 weights; QUInt8 per-tensor if that fails);
* ``ort transformers optimizer`` (``optimize_model(path, model_type="bert", num_heads, hidden_size)``,
  default opt_level, use_gpu False; heads and hidden size are read from the model by running it with
  its attention Reshape outputs exposed) and the same followed by ``quantize_dynamic``;
* ``ort quantize_static`` QDQ, per-channel, MinMax, after ``quant_pre_process``, reading the same
  calibration feeds;
* ``onnxsim`` and ``onnxslim`` (default settings, dynamic shapes kept).

Data (``fixtures/zoo_data.py``): evaluation sentences from the evaluation pool (seed 1), calibration
sentences from the calibration pool (seed 0), disjoint. Calibration samples are batch 1 at each
sentence's natural tokenized length (mixed lengths, at most 128), so one quantized model serves every
length; ``--calib fixed`` instead builds the calibrated variants once per measured length from
sentences padded/truncated to that length.

Per sequence length L (batch 1): every evaluation sentence is tokenized with bert-base-uncased
WordPiece and padded or truncated to exactly L tokens (``[CLS] ... [SEP]`` within L, attention mask 1
on real tokens, 0 on padding), so each length is measured at its own cost; all variants see the same
feeds. Measured for each variant:

* embedding cosine vs float, mean and min over sentences; the sentence embedding is the model's
  pooled output (the float rank-2 output; checked here to equal the attention-masked mean of the
  token embeddings), or that mean where a variant has no such output;
* nearest-neighbour agreement vs float: for each sentence, the index of its most similar other
  sentence by cosine; the fraction equal to float's;
* outputs vs float: the largest absolute difference over all float outputs, and whether every output
  is equal to float rounding (rtol 1e-4, atol 1e-5 + 1e-4 max|ref|; integer outputs exact);
* CPU-EP latency relative to float: ``onnxopt.runtime.timing.median_latencies`` (medians of runs,
  2 threads) on one feed of length L; float and the variant are timed one right after the other,
  each alone in its session (with several sessions open, onnxruntime's spinning worker threads
  slow every run on two cores, by 1.6x with two sessions and 5x with four here), their order
  alternating; repeated ``--reps`` times, the ratio taken within each repetition and its median
  reported with the range of the repetitions;
* file size ratio, main-graph node count, seconds to produce.

The summary checks the issue's done criteria per length: ``fold,fuse`` latency <= the ORT transformers
optimizer's, nodes <= onnxslim's, outputs equal to float rounding; each ``fold,fuse,quantize`` variant:
mean cosine >= 0.99, NN agreement >= 0.99, latency <= 0.9x the faster of the two ORT dynamic recipes
(quantize_dynamic alone, optimizer + quantize_dynamic), size <= 35% of float.

    python bench/transformers.py [--lengths 16,64,128] [--sentences 256] [--reps 5] [--quick]
                                 [--out bench/results/transformers.md] [--work-dir DIR] [--calib mixed|fixed]
                                 [--variants fuse,quantize,ort-dynamic,...]

Progress lines go to stderr (flushed); the tables go to stdout and to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures import zoo_data  # noqa: E402
from onnxopt.runtime.sessions import make_session  # noqa: E402
from onnxopt.runtime.timing import median_latencies  # noqa: E402

MODEL = ROOT / ".fixtures" / "models" / "minilm.onnx"
Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Variant:
    """One way of producing a model: `key` names it on the command line, `kind` picks the builder, `arg`
    its setting, `calibrated` whether it reads calibration data."""

    key: str
    name: str
    kind: str
    arg: str = ""
    calibrated: bool = False


VARIANTS = (
    Variant("float", "float", "float"),
    Variant("fuse", "onnxopt fold,fuse", "onnxopt", "fold,fuse"),
    Variant("quantize", "onnxopt fold,fuse,quantize", "onnxopt", "fold,fuse,quantize", True),
    Variant("quantize-vnni-no", "onnxopt fold,fuse,quantize{vnni=no}", "onnxopt", "fold,fuse,quantize{vnni=no}", True),
    Variant(
        "quantize-vnni-yes", "onnxopt fold,fuse,quantize{vnni=yes}", "onnxopt", "fold,fuse,quantize{vnni=yes}", True
    ),
    Variant("ort-dynamic", "ort quantize_dynamic", "ort_dynamic"),
    Variant("ort-optimizer", "ort transformers optimizer", "ort_transformers"),
    Variant("ort-optimizer-dynamic", "ort optimizer + quantize_dynamic", "ort_transformers_dynamic"),
    Variant("ort-static", "ort quantize_static QDQ", "ort_static", calibrated=True),
    Variant("onnxsim", "onnxsim", "onnxsim"),
    Variant("onnxslim", "onnxslim", "onnxslim"),
)
FUSE = "onnxopt fold,fuse"
QUANTIZE = tuple(v.name for v in VARIANTS if v.kind == "onnxopt" and v.calibrated)
ORT_DYNAMIC = ("ort quantize_dynamic", "ort optimizer + quantize_dynamic")
ORT_OPTIMIZER = "ort transformers optimizer"


def log(msg: str) -> None:
    """One progress line on stderr, flushed (also when stderr is not a terminal)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# inputs


def encode_fixed(sentences: Sequence[str], length: int, vocab: dict[str, int]) -> list[Feeds]:
    """One batch-1 feed per sentence, exactly `length` tokens: `[CLS] pieces [SEP]` truncated to fit,
    then padded with [PAD]=0; the attention mask is 1 on real tokens and 0 on padding."""
    out = []
    for s in sentences:
        ids = zoo_data.bert_encode(s, vocab, max_len=length)
        arr = np.zeros((1, length), dtype=np.int64)
        arr[0, : len(ids)] = ids
        mask = np.zeros_like(arr)
        mask[0, : len(ids)] = 1
        out.append({"input_ids": arr, "attention_mask": mask})
    return out


def encode_natural(sentences: Sequence[str], vocab: dict[str, int]) -> list[Feeds]:
    """One batch-1 feed per sentence at its own tokenized length (at most 128), no padding."""
    out = []
    for s in sentences:
        ids = np.array([zoo_data.bert_encode(s, vocab)], dtype=np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out


def write_calibration(feeds: Sequence[Feeds], folder: Path) -> Path:
    """The feeds as a directory of .npz samples (onnxopt's calibration format; ORT's reader reads it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **f)
    return folder


# ------------------------------------------------------------------------------------------------
# the model's facts


def attention_shape(path: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) read from the model itself: it is run on one feed with every Reshape
    output exposed; an attention Reshape gives [1, L, heads, head_size] with heads x head_size equal to
    the hidden size (the last dimension of the rank-3 float output)."""
    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.output[0] not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    length = 11
    feed = {"input_ids": np.full((1, length), 1000, np.int64), "attention_mask": np.ones((1, length), np.int64)}
    outs = make_session(model).run(None, feed)
    hidden = next(o.shape[-1] for o in outs if o.ndim == 3 and o.dtype.kind == "f")
    for o in outs:
        if o.ndim == 4 and o.shape[:2] == (1, length) and o.shape[2] * o.shape[3] == hidden and o.shape[2] > 1:
            return int(o.shape[2]), int(hidden)
        if o.ndim == 4 and o.shape[0] == 1 and o.shape[2] == length and o.shape[1] * o.shape[3] == hidden:
            return int(o.shape[1]), int(hidden)
    raise ValueError("no attention Reshape [1, L, heads, head_size] found")


@dataclass(frozen=True)
class OutputRoles:
    """Which float outputs are the token embeddings and the pooled sentence embedding (None if absent)."""

    names: tuple[str, ...]
    token: str
    pooled: str | None


def output_roles(outputs: dict[str, np.ndarray]) -> OutputRoles:
    """Token embeddings: the rank-3 float output; pooled: a rank-2 float output [1, hidden], if any."""
    token = next(k for k, v in outputs.items() if v.ndim == 3 and v.dtype.kind == "f")
    hidden = outputs[token].shape[-1]
    pooled = next(
        (k for k, v in outputs.items() if v.ndim == 2 and v.dtype.kind == "f" and v.shape[-1] == hidden), None
    )
    return OutputRoles(tuple(outputs), token, pooled)


def sentence_embedding(outputs: dict[str, np.ndarray], roles: OutputRoles, mask: np.ndarray) -> np.ndarray:
    """The pooled output where the model has one, else the masked mean of the token embeddings."""
    if roles.pooled is not None and roles.pooled in outputs:
        return outputs[roles.pooled].astype(np.float64)
    return zoo_data.mean_pool(outputs[roles.token], mask)


def node_count(path: Path) -> int:
    """Nodes of the main graph."""
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def file_size(path: Path) -> int:
    """Bytes of the model file plus its external-data files."""
    from onnxopt.ir.model_io import model_files

    return sum(p.stat().st_size for p in model_files(str(path)))


# ------------------------------------------------------------------------------------------------
# builders (run in a child process: `python bench/transformers.py --build KIND ARG SRC DST CALIB HEADS HIDDEN`)


class NpzReader:
    """onnxruntime CalibrationDataReader over a directory of .npz samples."""

    def __init__(self, folder: str):
        self.files = sorted(Path(folder).glob("*.npz"))
        self.rewind()

    def get_next(self) -> Feeds | None:
        p = next(self._it, None)
        return None if p is None else dict(np.load(p))

    def rewind(self) -> None:
        self._it = iter(self.files)


def _ort_dynamic(src: str, dst: str, contrib: bool = False) -> str:
    """quantize_dynamic, per-channel QInt8 weights; per-tensor QUInt8 if that fails. `contrib`: the
    model holds com.microsoft operators (the transformers optimizer's), whose outputs ONNX shape
    inference cannot type: ORT's documented `DefaultTensorType` option says they are float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if contrib else None
    try:
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, extra_options=extra)
        return "per-channel QInt8" + (" (DefaultTensorType float)" if contrib else "")
    except Exception as e:  # noqa: BLE001 - the recipe falls back, and says so in the row
        quantize_dynamic(src, dst, per_channel=False, weight_type=QuantType.QUInt8, extra_options=extra)
        return f"per-channel failed ({type(e).__name__}: {str(e)[:80]}); per-tensor QUInt8"


def _torch_stub() -> str:
    """onnxruntime's optimizer imports `torch.version` at opt_level >= 1 only to pick a GPU provider
    (`torch.version.hip`); where torch is not installed a stub module stands in (use_gpu is False, so
    it is never read) and the row says so."""
    try:
        import torch  # noqa: F401
    except ImportError:
        import types

        stub = types.ModuleType("torch")
        stub.version = types.SimpleNamespace(hip=None)  # type: ignore[attr-defined]
        sys.modules["torch"] = stub
        return "torch stubbed (not installed); "
    return ""


def _ort_transformers(src: str, dst: str, heads: int, hidden: int) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    note = _torch_stub()
    opt = optimize_model(src, model_type="bert", num_heads=heads, hidden_size=hidden, use_gpu=False)
    opt.save_model_to_file(dst)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return note + "fused " + ", ".join(f"{k} {v}" for k, v in sorted(fused.items()))


def _ort_static(src: str, dst: str, calib: str) -> str:
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst + ".pre.onnx"
    note = "quant_pre_process"
    try:
        quant_pre_process(src, pre)
    except Exception:  # noqa: BLE001 - symbolic shape inference may fail on dynamic shapes: retry without
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            note = "quant_pre_process (no symbolic shapes)"
        except Exception as e:  # noqa: BLE001 - preprocessing is optional; the row says it was skipped
            pre, note = src, f"no pre-process ({type(e).__name__})"
    quantize_static(pre, dst, NpzReader(calib), quant_format=QuantFormat.QDQ, per_channel=True)
    return note + ", QDQ per-channel MinMax"


def _onnxsim(src: str, dst: str) -> str:
    import onnxsim

    model, ok = onnxsim.simplify(src)
    onnx.save(model, dst)
    return "" if ok else "onnxsim's own check failed"


def _onnxslim(src: str, dst: str) -> str:
    import onnxslim

    onnx.save(onnxslim.slim(src), dst)
    return ""


def _pass_notes(records: list[dict]) -> str:
    """What each pass did, in a few words: 'fold+' for a pass that changed the model, else its reason;
    its non-zero counts (quantize's layers, fuse's fusions)."""
    parts = []
    for r in records:
        if not r.get("changed"):
            parts.append(f"{r['name']}: {str(r.get('reason', ''))[:70]}")
            continue
        stats = r.get("stats") or {}
        counts = ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool) and v)
        parts.append(f"{r['name']}+" + (f" ({counts[:90]})" if counts and r["name"] != "fold" else ""))
    return "; ".join(parts)


def build(kind: str, arg: str, src: str, dst: str, calib: str, heads: int, hidden: int) -> str:
    """Produce one variant from `src` into `dst`; returns a note for the table."""
    if kind == "onnxopt":
        import onnxopt

        result = onnxopt.optimize(src, arg, calibration=calib if "quantize" in arg else None, target="cpu")
        result.save(dst)
        return _pass_notes(result.report.get("passes", []))
    if kind == "ort_dynamic":
        return _ort_dynamic(src, dst)
    if kind == "ort_transformers":
        return _ort_transformers(src, dst, heads, hidden)
    if kind == "ort_transformers_dynamic":
        mid = dst + ".opt.onnx"
        note = _ort_transformers(src, mid, heads, hidden)
        return note + "; " + _ort_dynamic(mid, dst, contrib=True)
    if kind == "ort_static":
        return _ort_static(src, dst, calib)
    if kind == "onnxsim":
        return _onnxsim(src, dst)
    if kind == "onnxslim":
        return _onnxslim(src, dst)
    raise ValueError(f"unknown variant kind {kind!r}")


def _child(argv: list[str]) -> None:
    kind, arg, src, dst, calib, heads, hidden = argv
    t0 = time.perf_counter()
    note = build(kind, arg, src, dst, calib, int(heads), int(hidden))
    print(json.dumps({"seconds": time.perf_counter() - t0, "note": note}))


@dataclass
class Built:
    """A produced variant: its file, or why there is none."""

    variant: Variant
    path: Path | None
    seconds: float = 0.0
    note: str = ""
    error: str = ""


def produce(v: Variant, src: Path, dst: Path, calib: Path, shape: tuple[int, int], timeout: float) -> Built:
    """Run the builder of `v` in a child process; a crash, a timeout or a non-zero exit is a row."""
    if v.kind == "float":
        return Built(v, src)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build", v.kind, v.arg, str(src), str(dst), str(calib)]
    cmd += [str(shape[0]), str(shape[1])]
    try:
        # cwd: the work folder, as onnxruntime's quant_pre_process leaves temporary files in the current one
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=dst.parent)
    except subprocess.TimeoutExpired:
        return Built(v, None, timeout, error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return Built(v, None, error=f"failed (exit {proc.returncode}): {tail[:160]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return Built(v, dst, info["seconds"], info["note"])


# ------------------------------------------------------------------------------------------------
# measurement


@dataclass
class Row:
    """The numbers of one variant at one length."""

    built: Built
    nodes: int | None = None
    size_ratio: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None
    nn: float | None = None
    max_abs: float | None = None
    exact: bool | None = None
    latency: list[float] = field(default_factory=list)  # ratio to float, one per repetition
    error: str = ""

    @property
    def name(self) -> str:
        return self.built.variant.name

    @property
    def ok(self) -> bool:
        return self.built.path is not None and not self.error

    @property
    def lat(self) -> float | None:
        return statistics.median(self.latency) if self.latency else None


def run_all(path: Path, feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """Outputs by name for every feed (CPU EP, 2 threads)."""
    sess = make_session(str(path), threads=2)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


def _close(ref: np.ndarray, out: np.ndarray) -> bool:
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return False
    if ref.dtype.kind not in "fc":
        return bool(np.array_equal(ref, out))
    atol = 1e-5 + 1e-4 * float(np.max(np.abs(ref), initial=0))
    return bool(np.allclose(out, ref, rtol=1e-4, atol=atol))


def _by_name(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`out` keyed by the float output names: by name where all are present, else by position."""
    return out if set(ref) <= set(out) else dict(zip(ref, out.values()))


def compare(
    ref: list[dict[str, np.ndarray]], out: list[dict[str, np.ndarray]], roles: OutputRoles, feeds: Sequence[Feeds]
) -> dict[str, float | bool]:
    """Outputs of a variant against float's: largest difference over float outputs, whether every
    output is equal to float rounding, and the embedding metrics (cosine, NN agreement)."""
    exact, max_abs = True, 0.0
    mapped = [_by_name(r, o) for r, o in zip(ref, out)]
    for r, o in zip(ref, mapped):
        for k, a in r.items():
            b = o.get(k)
            exact = exact and b is not None and _close(a, b)
            if b is not None and a.shape == b.shape and a.dtype.kind == "f":
                max_abs = max(max_abs, float(np.max(np.abs(a.astype(np.float64) - b), initial=0)))
    emb_r = np.concatenate([sentence_embedding(r, roles, f["attention_mask"]) for r, f in zip(ref, feeds)])
    emb_o = np.concatenate([sentence_embedding(o, roles, f["attention_mask"]) for o, f in zip(mapped, feeds)])
    return {**zoo_data.embedding_metrics(emb_r, emb_o), "max_abs": max_abs, "exact": exact}


def latencies(rows: list[Row], feed: Feeds, reps: int, runs: int) -> list[float]:
    """Per repetition and variant: float and the variant timed one right after the other (order
    alternating between repetitions), each alone in its session (`median_latencies` of one model);
    the row gets the ratio. Returns float's absolute medians (seconds).

    One session at a time, not all variants interleaved: onnxruntime's worker threads spin after a
    run, and with several sessions open on two cores each run is timed against the others' spinning
    (MiniLM at L=16: 2.5 ms alone, 4 ms with two sessions open, 14 ms with four)."""
    float_path = str(rows[0].built.path)
    absolute = []
    for rep in range(reps):
        for r in rows[1:]:
            if not r.ok:
                continue
            order = [float_path, str(r.built.path)][:: 1 if rep % 2 == 0 else -1]
            secs = {p: median_latencies([p], feed, runs=runs, warmup=3, threads=2)[0] for p in order}
            absolute.append(secs[float_path])
            r.latency.append(secs[str(r.built.path)] / secs[float_path])
        rows[0].latency.append(1.0)
        log(f"  latency rep {rep + 1}/{reps}: float {statistics.median(absolute) * 1e3:.2f} ms")
    return absolute


def measure_length(
    builds: list[Built], length: int, sentences: Sequence[str], reps: int, runs: int
) -> tuple[list[Row], float]:
    """Every variant at sequence length `length` (float first in `builds`)."""
    feeds = encode_fixed(sentences, length, zoo_data.bert_vocab())
    rows = [Row(b) for b in builds]
    ref = run_all(rows[0].built.path, feeds)  # type: ignore[arg-type]
    roles = output_roles(ref[0])
    if roles.pooled is not None:
        gap = max(
            float(np.max(np.abs(zoo_data.mean_pool(r[roles.token], f["attention_mask"]) - r[roles.pooled])))
            for r, f in zip(ref, feeds)
        )
        log(f"L={length}: pooled output {roles.pooled!r} vs masked mean of {roles.token!r}: max |diff| {gap:.2g}")
    float_size = file_size(rows[0].built.path)  # type: ignore[arg-type]
    for row in rows:
        if row.built.path is None:
            continue
        row.nodes = node_count(row.built.path)
        row.size_ratio = file_size(row.built.path) / float_size
        try:
            m = compare(ref, run_all(row.built.path, feeds), roles, feeds)
        except Exception as e:  # noqa: BLE001 - a variant that does not run is a row saying so
            row.error = f"does not run: {type(e).__name__}: {str(e)[:160]}"
            log(f"L={length}: {row.name}: {row.error}")
            continue
        row.cos_mean, row.cos_min, row.nn = m["cos_mean"], m["cos_min"], m["nn_agreement"]
        row.max_abs, row.exact = float(m["max_abs"]), bool(m["exact"])
        log(f"L={length}: {row.name}: cos {row.cos_mean:.5f} (min {row.cos_min:.5f}), NN {row.nn:.4f}")
    float_secs = latencies(rows, feeds[0], reps, runs)
    return rows, statistics.median(float_secs)


# ------------------------------------------------------------------------------------------------
# tables and the done criteria


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _latency_cell(row: Row) -> str:
    if not row.latency:
        return ""
    lo, hi = min(row.latency), max(row.latency)
    return f"{row.lat:.2f}x ({lo:.2f}-{hi:.2f})"


def _outputs_cell(row: Row) -> str:
    if row.exact is None:
        return ""
    return f"{'equal' if row.exact else 'differ'}, max_abs {row.max_abs:.2g}"


def table(rows: Sequence[Row]) -> str:
    """One markdown table: a row per variant, failures included."""
    head = (
        "| variant | nodes | size | produce | cos mean | cos min | NN agree | outputs vs float | latency vs float "
        "(median, range) | note |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        note = r.built.error or r.error or r.built.note
        size = "" if r.size_ratio is None else f"{r.size_ratio:.2f}x"
        produce = "" if r.built.variant.kind == "float" or r.built.path is None else f"{r.built.seconds:.1f} s"
        cells = [
            r.name,
            "" if r.nodes is None else str(r.nodes),
            size,
            produce,
            _num(r.cos_mean, ".5f"),
            _num(r.cos_min, ".5f"),
            _num(r.nn, ".4f"),
            _outputs_cell(r),
            _latency_cell(r),
            note.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


Verdict = tuple[str, str, str]  # (criterion, PASS | FAIL | N/A, detail)


def _check(name: str, ok: bool | None, detail: str) -> Verdict:
    """A verdict; N/A (with no numbers) where a variant it needs was not built or did not run."""
    return (name, "N/A" if ok is None else ("PASS" if ok else "FAIL"), "not measured" if ok is None else detail)


def _le(a: float | None, b: float | None, factor: float = 1.0) -> bool | None:
    return None if a is None or b is None else a <= factor * b


def fuse_criteria(rows: dict[str, Row]) -> list[Verdict]:
    """fold,fuse: latency <= the ORT transformers optimizer's, nodes <= onnxslim's, outputs exact."""
    f, o, s = rows.get(FUSE), rows.get(ORT_OPTIMIZER), rows.get("onnxslim")
    f_lat, o_lat = (f.lat if f else None), (o.lat if o else None)
    f_nodes, s_nodes = (f.nodes if f else None), (s.nodes if s else None)
    exact = f.exact if f else None
    return [
        _check(
            f"{FUSE}: latency <= {ORT_OPTIMIZER}", _le(f_lat, o_lat), f"{_num(f_lat, '.2f')} vs {_num(o_lat, '.2f')}"
        ),
        _check(f"{FUSE}: nodes <= onnxslim", _le(f_nodes, s_nodes), f"{f_nodes} vs {s_nodes}"),
        _check(f"{FUSE}: outputs equal to float rounding", exact, _outputs_cell(f) if f else "not built"),
    ]


def quantize_criteria(rows: dict[str, Row], name: str) -> list[Verdict]:
    """A fold,fuse,quantize variant: cosine and NN agreement >= 0.99, latency <= 0.9x the faster ORT
    dynamic recipe, size <= 35% of float."""
    q = rows.get(name)
    dyn = [rows[d].lat for d in ORT_DYNAMIC if d in rows and rows[d].lat is not None]
    best = min(dyn) if dyn else None  # type: ignore[type-var]
    lat = q.lat if q else None
    cos = q.cos_mean if q else None
    nn = q.nn if q else None
    size = q.size_ratio if q else None
    return [
        _check(
            f"{name}: cosine >= 0.99", _le(0.99, cos), f"mean {_num(cos, '.5f')}, min {_num(q and q.cos_min, '.5f')}"
        ),
        _check(f"{name}: NN agreement >= 0.99", _le(0.99, nn), _num(nn, ".4f")),
        _check(
            f"{name}: latency <= 0.9x faster ORT dynamic",
            _le(lat, best, 0.9),
            f"{_num(lat, '.2f')} vs 0.9 x {_num(best, '.2f')}",
        ),
        _check(f"{name}: size <= 35% of float", _le(size, 0.35), _num(size and size * 100, ".1f") + "%"),
    ]


def criteria(rows: Sequence[Row]) -> list[Verdict]:
    """Every done criterion of the issue at one length (N/A where a variant it needs is missing)."""
    by_name = {r.name: r for r in rows if r.ok}
    out = fuse_criteria(by_name)
    for name in QUANTIZE:
        out += quantize_criteria(by_name, name)
    return out


def summary(verdicts: dict[int, list[Verdict]]) -> str:
    """A markdown table: a criterion per row, a column per length."""
    lengths = sorted(verdicts)
    lines = ["| criterion | " + " | ".join(f"L={n}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for i, (name, _, _) in enumerate(verdicts[lengths[0]]):
        cells = [f"{verdicts[n][i][1]} ({verdicts[n][i][2]})" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the run


def _produce_all(
    variants: Sequence[Variant], work: Path, tag: str, calib: Path, shape: tuple[int, int], timeout: float
) -> dict[str, Built]:
    out = {}
    for i, v in enumerate(variants):
        dst = work / f"{tag}-{i:02d}-{v.kind}.onnx"
        log(f"produce [{tag}] {v.name} ...")
        b = produce(v, MODEL, dst, calib, shape, timeout)
        log(f"produce [{tag}] {v.name}: " + (b.error or f"{b.seconds:.1f} s {b.note}"))
        out[v.name] = b
    return out


def _environment() -> str:
    import onnxruntime as ort

    from onnxopt.runtime.timing import cpu_info

    info = cpu_info()
    vnni = "yes" if any(f in info.get("flags", "").split() for f in ("avx512_vnni", "avx_vnni")) else "no"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        commit = rev.stdout.strip()
    except OSError:
        commit = "?"
    return (
        f"Machine: {info.get('model name', '?')}, {os.cpu_count()} cores, VNNI: {vnni}; onnxruntime "
        f"{ort.__version__}, onnx {onnx.__version__}; onnxopt at commit {commit} (plus the working tree); "
        f"load average at the start {os.getloadavg()[0]:.1f} (other work on the machine makes latencies noisy)."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16,64,128", help="sequence lengths, comma-separated")
    ap.add_argument("--sentences", type=int, default=None, help="evaluation sentences (default 256; quick 64)")
    ap.add_argument("--calib-sentences", type=int, default=None, help="calibration sentences (default 64; quick 16)")
    ap.add_argument("--reps", type=int, default=None, help="latency repetitions (default 5; quick 2)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per repetition (default 20; quick 10)")
    ap.add_argument("--calib", choices=("mixed", "fixed"), default="mixed", help="calibration lengths")
    ap.add_argument("--quick", action="store_true", help="fewer sentences and repetitions (a smoke run)")
    ap.add_argument(
        "--variants",
        default="",
        help="only these variants (comma-separated keys: fuse,quantize,ort-dynamic,...; float is always kept)",
    )
    ap.add_argument("--build-timeout", type=float, default=1800.0, help="seconds per produced variant")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "transformers.md")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the produced models here")
    args = ap.parse_args(argv)
    quick = {"sentences": 64, "calib_sentences": 16, "reps": 2, "runs": 10}
    full = {"sentences": 256, "calib_sentences": 64, "reps": 5, "runs": 20}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _selected(spec: str) -> list[Variant]:
    if not spec:
        return list(VARIANTS)
    keys = {s.strip() for s in spec.split(",")}
    unknown = keys - {v.key for v in VARIANTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(v.key for v in VARIANTS)}")
    return [v for v in VARIANTS if v.kind == "float" or v.key in keys]


def run(args: argparse.Namespace, work: Path) -> str:
    """Produce every variant, measure each length, return the markdown report."""
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = _selected(args.variants)
    eval_s = zoo_data.minilm_sentences(args.sentences, zoo_data.EVAL_SEED)
    calib_s = zoo_data.minilm_sentences(args.calib_sentences, zoo_data.CALIB_SEED)
    log(f"{len(eval_s)} evaluation sentences, {len(calib_s)} calibration sentences, lengths {lengths}")
    shape = attention_shape(MODEL)
    log(f"attention: {shape[0]} heads, hidden size {shape[1]}")
    vocab = zoo_data.bert_vocab()
    mixed = write_calibration(encode_natural(calib_s, vocab), work / "calib-mixed")
    plain = [v for v in variants if not v.calibrated]
    calibrated = [v for v in variants if v.calibrated]
    shared = _produce_all(plain, work, "all", mixed, shape, args.build_timeout)
    if args.calib == "mixed":
        shared.update(_produce_all(calibrated, work, "mixed", mixed, shape, args.build_timeout))
    sections, verdicts = [], {}
    for n in lengths:
        builds = dict(shared)
        if args.calib == "fixed":
            folder = write_calibration(encode_fixed(calib_s, n, vocab), work / f"calib-L{n}")
            builds.update(_produce_all(calibrated, work, f"L{n}", folder, shape, args.build_timeout))
        log(f"measure L={n} ...")
        rows, float_secs = measure_length([builds[v.name] for v in variants], n, eval_s, args.reps, args.runs)
        real = float(np.mean([min(len(zoo_data.bert_encode(s, vocab, n)), n) for s in eval_s]))
        head = f"### L = {n} (batch 1; mean real tokens {real:.1f}; float latency {float_secs * 1e3:.2f} ms)"
        sections.append(head + "\n\n" + table(rows))
        verdicts[n] = criteria(rows)
    settings = (
        f"Settings: {len(eval_s)} evaluation sentences (seed {zoo_data.EVAL_SEED}), {len(calib_s)} calibration "
        f"sentences (seed {zoo_data.CALIB_SEED}, {args.calib} lengths), latency {args.reps} repetitions x "
        f"{args.runs} runs (float and each variant alternately, one session at a time), 2 threads"
        f"{' (--quick)' if args.quick else ''}."
    )
    return "\n\n".join(
        [
            "# bench/transformers",
            "paraphrase-MiniLM-L3 (`.fixtures/models/minilm.onnx`): onnxopt against onnxruntime's transformer "
            "recipes, onnxsim and onnxslim. Method: see the docstring of `bench/transformers.py`.",
            _environment(),
            settings,
            *sections,
            "## Done criteria (issue #16)",
            summary(verdicts),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--build"]:
        _child(argv[1:])
        return 0
    args = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-transformers-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work)
    report += f"\n\nTotal: {time.perf_counter() - t0:.0f} s.\n"
    print(report, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
