"""SmoothQuant-style smoothing before the per-layer int8 choice (option `smooth`).

A LayerNormalization (or com.microsoft SkipLayerNormalization) output with outlier channels
loses its small channels to one int8 scale. Where every reader of that output is a layer with a
constant weight (MatMul input 0, com.microsoft Attention input 0), dividing gamma and beta by
s and multiplying the readers' weight rows by s is exact in float (`kernels.smoothing`), and
moves the outliers into the weights. The LayerNorm's mean/inv-std outputs must be unused;
SkipLayerNormalization's residual-sum output (3) and its bias input are not scaled by gamma, so
they are unaffected. Where the output also feeds other nodes (a residual Add, or the next
SkipLayerNormalization's skip input, as in fused BERT encoders), those readers get the output
multiplied back by s through one added elementwise Mul (exact in float up to rounding): the
residual stream keeps its values, only the weighted readers see the flattened channels. A
LayerNorm whose output is a graph output is not smoothed.

The strength a in STRENGTHS is chosen per LayerNorm by the output SQNR (on the sensitivity
samples, against the float model) of the model with that LayerNorm's readers alone in int8
(their dynamic form); a smoothing is kept only where it raises that SQNR, and all of them only
if they also raise the SQNR of the model with every smoothed reader in int8.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.data.observe import observe
from onnxopt.ir.ops import node_attrs, out_channel_axis
from onnxopt.kernels.observers import MinMaxObserver
from onnxopt.kernels.smoothing import apply_smoothing, smoothing_scales
from onnxopt.passes.quantize.dynamic import DYNAMIC
from onnxopt.passes.quantize.layer_weights import int8_weight
from onnxopt.passes.quantize.qdq import LayerQuant, apply_qdq
from onnxopt.passes.quantize.state import Constants, Work
from onnxopt.verify.outputs import output_sqnr, reference_outputs

#: The smoothing strengths tried per LayerNorm.
STRENGTHS = (0.5, 0.65, 0.8)
#: A tensor without a LayerNorm to fold into is smoothed (at the cost of one added Mul) only when
#: its largest channel maximum is at least this many times the median one: SmoothQuant's outlier
#: channels; below it one int8 scale already fits the channels alike.
OUTLIER_RATIO = 8.0
#: op type -> (domain, gamma input, beta input, outputs that must be unused).
_NORMS = {
    "LayerNormalization": (("", "ai.onnx"), 1, 2, (1, 2)),
    "SkipLayerNormalization": (("com.microsoft",), 2, 3, (1, 2)),
}


@dataclass
class Site:
    """A tensor that constant-weight layers (`readers`) read, which smoothing divides by s per
    channel. `norm`: the LayerNorm producing it, which absorbs the division into gamma/beta, with
    `others` (its other readers) getting the output multiplied back by s; None: the division is
    an added Mul in front of `readers` alone."""

    tensor: str
    readers: list[onnx.NodeProto]
    norm: onnx.NodeProto | None = None
    others: list[onnx.NodeProto] = field(default_factory=list)
    absmax: np.ndarray | None = None
    #: strength -> model SQNR (dB) with this site's readers in int8 (0.0: not smoothed).
    sqnr: dict[float, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The node or tensor the report names."""
        return self.norm.name if self.norm is not None else self.tensor


def smoothing_sites(model: onnx.ModelProto, consts: Constants) -> tuple[list[Site], list[dict[str, str]]]:
    """The tensors smoothing can rewrite exactly (LayerNorm outputs first, then the other inputs of
    constant-weight MatMul/Attention layers), and the LayerNorms it cannot, with why not."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in model.graph.output}
    sites, skipped, seen = [], [], set()
    for n in model.graph.node:
        spec = _NORMS.get(n.op_type)
        if spec is None or n.domain not in spec[0]:
            continue
        why = _site_problem(n, spec, consts, readers, outputs)
        seen.add(n.output[0])
        if why:
            skipped.append({"node": n.name, "op": n.op_type, "reason": f"not smoothed: {why}"})
            continue
        weighted, others = _split_readers(n.output[0], readers, consts)
        sites.append(Site(n.output[0], weighted, n, others))
    for t in readers:
        if t in seen or t in consts:
            continue
        weighted, _ = _split_readers(t, readers, consts)
        widths = {consts[u.input[1]].shape[0] for u in weighted}
        if weighted and len(widths) == 1:
            sites.append(Site(t, weighted))
    return sites, skipped


def _split_readers(t: str, readers: dict, consts: Constants) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """The readers of `t` that read it as a constant-weight layer's input, and the others."""
    users = readers.get(t, [])
    weighted = [u for u in users if _reads_as_weighted_input(u, t, consts)]
    return weighted, [u for u in users if not any(u is w for w in weighted)]


def _site_problem(n, spec, consts: Constants, readers: dict, outputs: set[str]) -> str | None:
    """Why LayerNorm `n` cannot be smoothed exactly (None: it can)."""
    _, gi, bi, unused = spec
    if any(i < len(n.output) and n.output[i] and (n.output[i] in readers or n.output[i] in outputs) for i in unused):
        return "its mean / inv-std outputs are used"
    if n.op_type == "LayerNormalization" and node_attrs(n).get("axis", -1) != -1:
        return "normalizes over more than the last axis"
    gamma = consts.get(n.input[gi]) if gi < len(n.input) else None
    beta = n.input[bi] if bi < len(n.input) else ""
    if gamma is None or gamma.ndim != 1 or gamma.dtype != np.float32 or (beta and beta not in consts):
        return "gamma or beta is not a constant 1-D float"
    out = n.output[0]
    if out in outputs or not readers.get(out):
        return "its output is a graph output or unread"
    return _readers_problem(out, gamma.shape[0], readers, consts)


def _readers_problem(out: str, channels: int, readers: dict, consts: Constants) -> str | None:
    """Why the constant-weight readers of LayerNorm output `out` rule smoothing out (None: they don't)."""
    rows = [consts[u.input[1]].shape[0] for u in _split_readers(out, readers, consts)[0]]
    if not rows:
        return "no MatMul/Attention with a constant weight reads its output"
    if any(r != channels for r in rows):
        return "its readers' weights do not match its channels"
    return None


def _reads_as_weighted_input(u: onnx.NodeProto, t: str, consts: Constants) -> bool:
    """Whether `u` reads `t` only as input 0 of a MatMul / com.microsoft Attention with a
    constant 2-D float weight."""
    if not (u.op_type == "MatMul" or (u.op_type == "Attention" and u.domain == "com.microsoft")):
        return False
    if u.input[0] != t or list(u.input).count(t) != 1 or u.input[1] not in consts:
        return False
    w = consts[u.input[1]]
    return w.ndim == 2 and w.dtype == np.float32


def smoothed_model(
    model: onnx.ModelProto, consts: Constants, sites: list[Site], alphas: list[float]
) -> onnx.ModelProto:
    """A copy of `model` with each site smoothed at its strength (new initializers: shared gammas
    and weights stay as they were for their other readers); the added Muls sit right after the
    LayerNorm they undo or right before the first reader they divide for."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    at = {id(n): i for i, n in enumerate(model.graph.node)}  # sites hold nodes of `model`
    nodes = out.graph.node
    before: dict[int, list[onnx.NodeProto]] = collections.defaultdict(list)
    for k, (site, a) in enumerate(zip(sites, alphas)):
        if a == 0.0:  # not smoothed (a strength of 0 would still divide by max|W|)
            continue
        weights = [consts[u.input[1]] for u in site.readers]
        assert site.absmax is not None  # measured before any variant is built
        s = smoothing_scales(site.absmax, weights, a)
        if site.norm is not None:
            _, gi, bi, _ = _NORMS[site.norm.op_type]
            norm = nodes[at[id(site.norm)]]
            beta_name = norm.input[bi] if bi < len(norm.input) else ""
            g, b, ws = apply_smoothing(consts[norm.input[gi]], consts[beta_name] if beta_name else None, weights, s)
            norm.input[gi] = _add(out, f"{norm.input[gi]}.smoothed{at[id(site.norm)]}", g)
            if b is not None:
                norm.input[bi] = _add(out, f"{beta_name}.smoothed{at[id(site.norm)]}", b)
            before[at[id(site.norm)] + 1].extend(_renamed(out, norm, [nodes[at[id(u)]] for u in site.readers], s, k))
        else:
            _, _, ws = apply_smoothing(np.ones_like(s), None, weights, s)
            readers = [nodes[at[id(u)]] for u in site.readers]
            first = min(at[id(u)] for u in site.readers)
            before[first].append(_scaling(out, site.tensor, 1.0 / s, readers, f"smoothed{k}"))
        for u, w in zip(site.readers, ws):
            nodes[at[id(u)]].input[1] = _add(out, f"{u.input[1]}.smoothed{at[id(u)]}", w)
    if before:
        order: list[onnx.NodeProto] = []
        for i, n in enumerate(nodes):
            order.extend(before.get(i, ()))
            order.append(n)
        del out.graph.node[:]
        out.graph.node.extend(order)
    return out


def _renamed(
    model: onnx.ModelProto, norm: onnx.NodeProto, readers: list[onnx.NodeProto], s: np.ndarray, k: int
) -> list[onnx.NodeProto]:
    """Give the smoothed LayerNorm output a name of its own, read by the weighted `readers`: a tensor
    that keeps its name keeps its values (what `onnxopt diff` matches by). The original name, where
    other nodes still read it, is the output of a Mul by s that restores it."""
    tensor, smoothed = norm.output[0], f"{norm.output[0]}.smoothed{k}"
    norm.output[0] = smoothed
    for r in readers:
        r.input[0] = smoothed
    if not any(tensor in n.input for n in model.graph.node):
        return []
    scale = _add(model, f"{tensor}.smoothing_scale{k}", np.asarray(s, np.float32))
    return [helper.make_node("Mul", [smoothed, scale], [tensor], name=f"{tensor}.unsmoothed{k}")]


def _scaling(model: onnx.ModelProto, tensor: str, s: np.ndarray, readers: list[onnx.NodeProto], tag: str):
    """A Mul node giving `tensor` times `s` (per last-axis channel) to `readers`, whose inputs are
    renamed to its output."""
    scale = _add(model, f"{tensor}.{tag}.scale", np.asarray(s, np.float32))
    scaled = f"{tensor}.{tag}"
    for r in readers:
        for j, t in enumerate(r.input):
            if t == tensor:
                r.input[j] = scaled
    return helper.make_node("Mul", [tensor, scale], [scaled], name=f"{tensor}.{tag}")


def _add(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    """Add initializer `name` holding `value`; returns its name."""
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def smooth(model: onnx.ModelProto, data, opts: Any, per_channel: bool) -> tuple[onnx.ModelProto, list[str], list]:
    """`model` with the smoothings that measured better (the input model itself when none), notes on
    the LayerNorms looked at, and one report entry per smoothed LayerNorm."""
    if opts.smooth == "off":
        return model, [], []
    consts = Constants(model)
    sites, skipped = smoothing_sites(model, consts)
    sites = [s for s in sites if any(_quantizable(opts, u) for u in s.readers)]
    why = collections.Counter(x["reason"] for x in skipped)
    notes = [f"smoothing: {k} ({n} LayerNorms)" for k, n in sorted(why.items())]
    if not sites:
        return model, notes, []
    for i, n in enumerate(model.graph.node):  # the names `selection.candidates` would give
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    sites = _with_absmax(model, data, sites)
    sites, note = _worth_a_mul(sites)
    notes += note
    if not sites:
        return model, notes, []
    trial = _Trials(model, consts, data, opts, per_channel)
    for s in sites:
        s.sqnr = {0.0: trial.sqnr([s], [0.0])} | {a: trial.sqnr([s], [a]) for a in STRENGTHS}
    kept = [s for s in sites if max(s.sqnr.values()) > s.sqnr[0.0]]
    if not kept:
        return model, notes + ["smoothing: no site's readers measured better smoothed"], []
    best = [max(STRENGTHS, key=s.sqnr.__getitem__) for s in kept]
    before, after = trial.sqnr(kept, [0.0] * len(kept)), trial.sqnr(kept, best)
    if after <= before:
        return model, notes + [f"smoothing: kept off, the model measured {after:.1f} <= {before:.1f} dB smoothed"], []
    folded = sum(s.norm is not None for s in kept)
    notes.append(
        f"smoothing: {folded} LayerNorm outputs and {len(kept) - folded} other layer inputs smoothed, "
        f"{before:.1f} -> {after:.1f} dB with their readers int8"
    )
    return smoothed_model(model, consts, kept, best), notes, [_entry(s, a) for s, a in zip(kept, best)]


def _entry(s: Site, a: float) -> dict[str, Any]:
    """The report entry of a site smoothed at strength `a`."""
    return {
        "node": s.name,
        "how": "into the LayerNorm" if s.norm is not None else "added Mul",
        "strength": a,
        "readers_sqnr_db": [round(s.sqnr[0.0], 2), round(s.sqnr[a], 2)],
    }


def _worth_a_mul(sites: list[Site]) -> tuple[list[Site], list[str]]:
    """The sites kept for trials: every LayerNorm output, and the other tensors only where they
    have outlier channels; a note on those dropped."""
    kept = [s for s in sites if s.norm is not None or _has_outliers(s)]
    dropped = len(sites) - len(kept)
    if not dropped:
        return kept, []
    return kept, [
        f"smoothing: {dropped} layer inputs without outlier channels (max < {OUTLIER_RATIO:g}x median channel) "
        "left as they are"
    ]


def _with_absmax(model: onnx.ModelProto, data, sites: list[Site]) -> list[Site]:
    """`sites` with the per-channel (last axis) absmax of their tensors over the calibration data
    (one run for all of them); a site whose tensor held no finite value, or whose channels are not
    its readers' weight rows, is dropped."""
    found = observe(model, data, [s.tensor for s in sites], _last_axis_minmax, desc="quantize: smoothing")
    for s in sites:
        o = found[s.tensor]
        s.absmax = np.maximum(np.abs(o.min), np.abs(o.max)) if o.min is not None and o.max is not None else None
    consts = Constants(model)
    return [
        s
        for s in sites
        if s.absmax is not None
        and s.absmax.ndim == 1
        and np.all(np.isfinite(s.absmax))
        and all(consts[u.input[1]].shape[0] == s.absmax.shape[0] for u in s.readers)
    ]


def _has_outliers(site: Site) -> bool:
    """Whether a few channels of the site's tensor reach far above the typical one: what makes
    smoothing worth an added Mul."""
    assert site.absmax is not None
    typical = float(np.median(site.absmax))
    return typical > 0 and float(site.absmax.max()) >= OUTLIER_RATIO * typical


def _last_axis_minmax(tensor: str) -> MinMaxObserver:
    """A per-channel (last axis) min/max observer: LayerNorm outputs have their channels last."""
    return MinMaxObserver(axis=-1)


class _Trials:
    """Output SQNR (dB, on the sensitivity samples against the float model) of the model with some
    sites smoothed and their readers in their dynamic int8 form."""

    def __init__(self, model: onnx.ModelProto, consts: Constants, data, opts: Any, per_channel: bool) -> None:
        self.model, self.consts, self.data, self.opts, self.per_channel = model, consts, data, opts, per_channel
        self.samples = [x for _, x in zip(range(max(1, opts.sensitivity_samples)), data)]
        self.reference = reference_outputs(model, self.samples)

    def sqnr(self, chosen: list[Site], alphas: list[float]) -> float:
        """SQNR with `chosen` smoothed at `alphas` (0: not smoothed) and their readers int8."""
        m = smoothed_model(self.model, self.consts, chosen, alphas) if any(alphas) else self.model
        work = Work(m, self.data, self.opts, self.per_channel, [])
        readers = [u for s in chosen for u in s.readers if _quantizable(self.opts, u)]
        layers = [_dynamic(work, work.nodes[u.name]) for u in readers]
        return output_sqnr(apply_qdq(m, {}, layers), self.samples, self.reference)


def _quantizable(opts: Any, u: onnx.NodeProto) -> bool:
    """Whether the pass may give reader `u` an int8 form (MatMul in `op_types`, or Attention with
    `int8_attention`)."""
    if u.op_type == "MatMul":
        return u.op_type in opts.op_types
    qattention_form = len(u.input) > 2 and bool(u.input[2]) and not any(u.input[5:])
    return bool(opts.int8_attention) and qattention_form and "qkv_hidden_sizes" not in node_attrs(u)


def _dynamic(work: Work, n: onnx.NodeProto) -> LayerQuant:
    """The dynamic int8 form of reader `n` (input quantized per run), as `forms` builds it."""
    q, s, z, notes = int8_weight(work, n, u8_inputs=True)
    return LayerQuant(n.name, q, s, z, out_channel_axis(n), notes=notes, form=DYNAMIC)
