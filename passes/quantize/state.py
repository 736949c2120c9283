"""The state of one run of the quantize pass over a ModelProto, and the models built from it.

`Work` holds what every step reads (the float model, its constants and
use-def maps, the options, the report rows) and builds the candidate models
the steps compare: the QDQ model for a set of layers, a layer alone, and the
output SQNR of any of them on the sensitivity samples.
"""

from __future__ import annotations

import collections.abc
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.ir.weights import has_external, is_external, mapped
from onnxopt.passes.quantize.dynamic import DYNAMIC
from onnxopt.passes.quantize.proto_graphs import constant_node_value, walk_graphs
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant, apply_qdq, single_layer_model
from onnxopt.runtime.timing import TimingCache, cpu_info
from onnxopt.verify.outputs import output_sqnr, reference_outputs

#: A report row of one layer ({"node", "op", "int8", "why", ...}).
Row = dict[str, Any]
#: A layer that can only store int8 weights: its row and its (weight tensor, output-channel axis) pairs.
Outside = tuple[Row, list[tuple[str, int]]]


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (u8s8 dot products without int16 saturation)."""
    return bool(re.search(r"\b(avx512_vnni|avx_vnni)\b", cpu_info().get("flags", "")))


def opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def static(shape: tuple | None) -> bool:
    """Whether `shape` is known and every dimension a positive number (a model of it can run)."""
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether one of the regexes `patterns` matches somewhere in `name`."""
    return any(re.search(p, name) for p in patterns)


class Constants(collections.abc.Mapping):
    """Initializers and Constant-node values by tensor name.

    Weights staged on disk (big models, `onnxopt.weights`) are memory-mapped afresh on
    each access, so the pages read while quantizing one layer are released with it
    instead of piling up to a second copy of the model; the rest is read once.
    """

    def __init__(self, model: onnx.ModelProto):
        self._protos = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            value = constant_node_value(n)
            if value is not None:
                self._protos[n.output[0]] = value
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._protos[name]
        if is_external(t):
            return mapped(t)
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(t)
        return self._arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def for_model(self, name: str) -> np.ndarray | onnx.TensorProto:
        """What to put in a new model: the staged tensor itself (no copy), else the array."""
        t = self._protos[name]
        return t if is_external(t) else self[name]


class Work:
    """One run of the pass over a ModelProto: the state its steps share."""

    def __init__(
        self, model: onnx.ModelProto, data, opts: Any, per_channel: bool, notes: list[str], executor=None
    ) -> None:
        self.model, self.data, self.opts, self.per_channel, self.notes = model, data, opts, per_channel, notes
        self.executor = executor
        self.act_type = "int8" if opts.activations == "int8" else "uint8"
        self.vnni = cpu_has_vnni() if opts.vnni == "auto" else opts.vnni in ("yes", "true", "1")
        self.consts = Constants(model)
        self.big = has_external(model)  # weights staged on disk (`onnxopt.weights`): mind memory
        self.nodes = {n.name: n for n in model.graph.node}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
            for t in n.output:
                self.producer[t] = n
        self.skipped: list[dict[str, str]] = []
        self.rows: dict[str, Row] = {}
        #: Layers that already compute in integers (pre-quantized models): reported, left alone.
        self.already: list[dict[str, str]] = []
        self.outside: list[Outside] = []
        self.cands: list[onnx.NodeProto] = []
        self.samples: list | None = None
        self.reference: list | None = None
        #: Timings of float and int8 forms for the latency steps (set once the layers are quantized).
        self.timing: TimingCache
        #: Calibrated (min, max) of each activation tensor, observed activation shapes, tensor infos.
        self.ranges: dict[str, tuple[float, float]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.info: dict = {}
        #: Per-channel input means by layer (bias correction), layers that store int8 weights.
        self.means: dict[str, np.ndarray] = {}
        self.store: dict[str, LayerQuant] = {}
        #: The dynamic form of each MatMul that has one (`forms.py` chooses between the forms).
        self.dynamic: dict[str, LayerQuant] = {}
        #: Output SQNR (dB) of each (layer, form) alone in int8, measured once per run.
        self.alone_sqnr: dict[tuple[str, str], float] = {}

    @property
    def already_main(self) -> set[str]:
        """Names of the main graph's layers that are already int8 (QDQ MAC layers among them)."""
        return {r["node"] for r in self.already if r["where"] == "main graph"}

    def weight_array(self, tensor: str) -> np.ndarray:
        """A constant's value, wherever in the model (main graph or a body) it is defined."""
        if tensor in self.consts:
            return self.consts[tensor]
        for _, _, scopes in walk_graphs(self.model.graph):
            if tensor in scopes[0]:
                return numpy_helper.to_array(scopes[0][tensor])
        raise KeyError(tensor)

    def ensure_reference(self) -> None:
        """The sensitivity samples and the float model's outputs on them (computed once)."""
        if self.samples is None:
            self.samples = [s for _, s in zip(range(max(1, self.opts.sensitivity_samples)), self.data)]
            self.reference = reference_outputs(self.model, self.samples)

    @property
    def drawn_samples(self) -> list:
        """`samples`, which `ensure_reference` draws before any step that runs them."""
        assert self.samples is not None, "ensure_reference() first"
        return self.samples

    @property
    def float_reference(self) -> list:
        """`reference`, which `ensure_reference` computes before any step that compares with it."""
        assert self.reference is not None, "ensure_reference() first"
        return self.reference

    def output_sqnr(self, model: onnx.ModelProto, reference=None) -> float:
        """Mean over the sensitivity samples of the worst output's SQNR (dB) against `reference`
        outputs (default: the float model's)."""
        return output_sqnr(model, self.drawn_samples, self.float_reference if reference is None else reference)

    def layer_model(self, n: onnx.NodeProto, shape: tuple | None) -> onnx.ModelProto:
        """A float model of `n` alone with its constant inputs (staged ones referenced, not copied;
        a computed optional input such as an Attention's mask left out), input of `shape` (None:
        unknown)."""
        consts = {k: self.consts.for_model(k) for k in n.input[1:] if k in self.consts}
        return single_layer_model(n, consts, shape, opset(self.model))

    def qdq_tensors(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> dict[str, ActParams]:
        """The activations that get Q/DQ when `layers` are int8: their inputs, Conv and MatMul outputs
        always (QLinearConv and QLinearMatMul need the Q; onnxruntime's fusion of a QDQ MatMul with
        a float output depends on the graph around it: a MatMul feeding Relu -> MatMul + Add stays
        unfused and dequantizes its weight on every run), Gemm outputs only when every consumer is
        a quantized layer (QGemm has a float output). Dynamic layers quantize their input per run
        and have a float output: no Q/DQ of their own."""
        static_layers = [lq for lq in layers if lq.form != DYNAMIC]
        kept = {lq.node for lq in static_layers}
        tensors: dict[str, ActParams] = {}
        for lq in static_layers:
            n = self.nodes[lq.node]
            tensors[n.input[0]] = acts[n.input[0]]
            out = n.output[0]
            users = self.consumers.get(out, [])
            if n.op_type in ("Conv", "ConvTranspose", "MatMul") or (users and all(u.name in kept for u in users)):
                tensors[out] = acts[out]
        return tensors

    def build(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> onnx.ModelProto:
        """The QDQ model for `layers` (activations from `qdq_tensors`); the stored layers that are not
        among them keep float compute with int8 weights."""
        kept = {lq.node for lq in layers}
        stored = [lq for name, lq in self.store.items() if name not in kept]
        return apply_qdq(self.model, self.qdq_tensors(acts, layers), layers, stored)

    def loaded_form(self, acts: dict[str, ActParams], layers: list[LayerQuant]) -> onnx.ModelProto:
        """The int8 model as onnxruntime holds it once loaded: `layers` in QDQ form, the layers that
        only store int8 weights with their float weights, which is what folding at load gives them
        back (`storage_folds`, or `folding_alone` for big models, made sure of that). Checking the
        stored form instead would change nothing per run but, for a big model, cost a session
        that folds every layer at once (about 3x its float weights in memory)."""
        return apply_qdq(self.model, self.qdq_tensors(acts, layers), layers)
