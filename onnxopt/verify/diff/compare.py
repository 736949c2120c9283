"""`diff_models`: compare two models tensor by tensor, a chunk of tensors at a time.

For each chunk of matched tensors (`matching.match_tensors`, in the
reference's topological order) both models run over the samples with only that
chunk's tensors as outputs (`runs`), and one extra model holding the chunk's
layers (`layers`) runs on the reference's values of the layers' inputs. Per
sample, the metrics are kept and the arrays dropped; the worst case over the
samples is judged with the limits of the candidate's tolerance class
(`onnxopt.verify.tolerance`, by the rule `validate` and `--check` use). Memory:
the two models' sessions (weights mapped from the staging directory) plus one
sample's values of one chunk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxopt.data.pinning import check_pinnable
from onnxopt.data.samples import CalibrationData, Sample, seeded_inputs
from onnxopt.errors import UserError
from onnxopt.ir.model_io import load_model
from onnxopt.verify.comparison import SampleMetrics, merge_sample_metrics, output_metrics
from onnxopt.verify.diff.bisection import bisect_dumps
from onnxopt.verify.diff.layers import chunk_layers_model, layer_output
from onnxopt.verify.diff.matching import Layer, Match, layer_regions, match_tensors
from onnxopt.verify.diff.results import DiffReport, TensorDiff
from onnxopt.verify.diff.runs import ChunkRun, EpChunkRun, stage_weights
from onnxopt.verify.provenance import resolve_tolerance
from onnxopt.verify.tolerance import Thresholds, Tolerance

Rows = list[dict[str, SampleMetrics]]


@dataclass
class DiffOptions:
    """How to run a diff: samples (calibration data or seeded random), provider, chunk size, limits."""

    data: str | os.PathLike | list[Sample] | None = None
    samples: int = 4
    ep: str = "cpu"
    chunk: int = 32
    tolerance: str | None = None
    seed: int = 0
    input_shapes: dict[str, tuple[int, ...]] | None = None
    #: `optimize --dump-dir` of the candidate: bisect over its per-pass dumps for the pass at fault.
    dump_dir: str | os.PathLike | None = None


def load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A model we may change (its weights get staged) and its label."""
    if isinstance(model, onnx.ModelProto):
        own = onnx.ModelProto()
        own.CopyFrom(model)
        return own, "<model>"
    return load_model(model), str(model)


def diff_inputs(ref: onnx.ModelProto, opts: DiffOptions) -> tuple[list[Sample], str]:
    """The samples to run, and where they come from."""
    if opts.input_shapes:
        check_pinnable(ref, opts.input_shapes)
    if opts.data is not None:
        feeds = list(CalibrationData(opts.data, ref, limit=opts.samples))
        where = str(opts.data) if isinstance(opts.data, (str, os.PathLike)) else "given samples"
        return feeds, f"{len(feeds)} samples from {where}"
    feeds = seeded_inputs(ref, opts.samples, opts.seed, opts.input_shapes)
    return feeds, f"{len(feeds)} seeded random samples (seed {opts.seed})"


def diff_models(
    ref: str | os.PathLike | onnx.ModelProto,
    cand: str | os.PathLike | onnx.ModelProto,
    opts: DiffOptions | None = None,
) -> DiffReport:
    """Compare `cand` with `ref` tensor by tensor; see the module's docstring."""
    opts = opts or DiffOptions()
    if opts.chunk < 1:
        raise UserError(f"--chunk {opts.chunk}: give at least 1 tensor per chunk")
    ref_model, ref_label = load(ref)
    cand_model, cand_label = load(cand)
    tol, source, warnings = resolve_tolerance(cand_model, opts.tolerance)
    limits = Tolerance.named(tol).pass_
    feeds, described = diff_inputs(ref_model, opts)
    matches = match_tensors(ref_model, cand_model)
    if not matches:
        raise UserError(f"{cand_label}: no tensor of {ref_label} found in it by name; is it made from that model?")
    layers = _checked_layers(cand_model, matches)
    stage_weights(ref_model)
    stage_weights(cand_model)
    report = DiffReport(ref_label, cand_label, opts.ep, tol, source, limits.describe(), described, warnings=warnings)
    report.unmatched = sum(1 for n in ref_model.graph.node for o in n.output if o) - len(matches)
    report.chunk_size = opts.chunk
    total: Rows = [{} for _ in feeds]
    own: Rows = [{} for _ in feeds]
    for start in range(0, len(matches), opts.chunk):
        idx = list(range(start, min(start + opts.chunk, len(matches))))
        _run_chunk(ref_model, cand_model, matches, layers, idx, feeds, opts.ep, total, own)
        report.chunks += 1
    report.tensors = _judged(matches, layers, total, own, limits)
    if opts.dump_dir is not None:
        report.bisect = bisect_dumps(ref_model, opts.dump_dir, feeds, limits)
    return report


def _checked_layers(cand: onnx.ModelProto, matches: list[Match]) -> list[Layer]:
    """Each match's layer; one that reads a tensor with no reference value is marked with why."""
    inputs = {i.name for i in cand.graph.input}
    matched = {m.cand for m in matches}
    layers = layer_regions(cand, matches)
    for layer in layers:
        lost = [f for f in layer.frontier if f not in matched and f not in inputs]
        if lost and not layer.problem:
            layer.problem = f"reads {lost[0]}, which has no reference value"
    return layers


def _run_chunk(
    ref: onnx.ModelProto,
    cand: onnx.ModelProto,
    matches: list[Match],
    layers: list[Layer],
    idx: list[int],
    feeds: list[Sample],
    ep: str,
    total: Rows,
    own: Rows,
) -> None:
    """Run one chunk of matches over every sample and add each sample's metrics to `total` and `own`."""
    ref_of = {m.cand: m.ref for m in matches}
    measured = {k: layers[k] for k in idx if not layers[k].problem}
    frontier, ref_names, cand_names = _chunk_names(matches, measured, idx, ref_of)
    ref_run = ChunkRun(ref, ref_names)
    cand_run = ChunkRun(cand, cand_names) if ep == "cpu" else EpChunkRun(cand, cand_names, ep, feeds)
    layer_run: ChunkRun | None = None
    for s, sample in enumerate(feeds):
        r = ref_run.values(sample)
        c = cand_run.values(sample)
        for k in idx:
            _add(total[s], matches[k].ref, r, c.get(matches[k].cand))
        if not measured:
            continue
        values = {f: r[ref_of[f]] if f in ref_of else sample[f] for f in frontier}
        if layer_run is None:
            dtypes = {f: (np.asarray(v).dtype, np.ndim(v)) for f, v in values.items()}
            model = chunk_layers_model(cand, measured, {k: matches[k].cand for k in measured}, dtypes)
            layer_run = ChunkRun(model, [layer_output(k, matches[k].cand) for k in measured])
        local = layer_run.values(values)
        for k in measured:
            _add(own[s], matches[k].ref, r, local.get(layer_output(k, matches[k].cand)))


def _chunk_names(
    matches: list[Match], measured: dict[int, Layer], idx: list[int], ref_of: dict[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """The tensors a chunk needs: its layers' inputs (candidate names), the reference tensors to expose
    (the chunk's own and the layers' inputs), and the candidate tensors to expose."""
    frontier = list(dict.fromkeys(f for layer in measured.values() for f in layer.frontier))
    ref_names = list(dict.fromkeys([matches[k].ref for k in idx] + [ref_of[f] for f in frontier if f in ref_of]))
    cand_names = list(dict.fromkeys(matches[k].cand for k in idx))
    return frontier, ref_names, cand_names


def _add(rows: dict[str, SampleMetrics], name: str, ref: Mapping[str, object], cand: object) -> None:
    """Add how `cand` differs from the reference's `name` on one sample (no top-k: inner tensors hold no
    class scores). Values that are not tensors (sequences, maps) are not compared."""
    r = ref.get(name)
    if isinstance(r, np.ndarray) and (cand is None or isinstance(cand, np.ndarray)):
        rows[name] = output_metrics(name, r, cand, 1, set())


def _judged(matches: list[Match], layers: list[Layer], total: Rows, own: Rows, limits: Thresholds) -> list[TensorDiff]:
    """One `TensorDiff` per match: the worst case over the samples, judged."""
    totals = {oc.output: oc for oc in merge_sample_metrics("diff", total, limits)}
    owns = {oc.output: oc for oc in merge_sample_metrics("own", own, limits)}
    out = []
    for m, layer in zip(matches, layers):
        t = TensorDiff(m.ref, m.cand, m.node, m.op, m.depth, m.how, own_problem=layer.problem)
        if m.ref in totals:
            t.set_total(totals[m.ref])
        if m.ref in owns:
            t.set_own(owns[m.ref])
        out.append(t)
    return out
