"""Measure float16 storage against the float model on the calibration data, tensor by tensor.

onnxruntime's CPU EP is no float16 emulator: a node without a float16 CPU
kernel gets Casts to float32 around it, and the Cast pairs that meet are then
dropped, rounding included, so a converted model measured there often shows no
error at all. The measured candidate is therefore the float model with every
float16 node's inputs and outputs rounded to float16 (`emulated`): each value
float16 stores, in float32 arithmetic, as GPUs and OpenVINO accumulate.

Both models go into one ONNX graph that shares the inputs: the candidate's names
get a prefix, and for every compared tensor `t` the graph also computes
`t - float(candidate's t)`. Streaming the samples through it with the common
observation loop (`onnxopt.data.observe`) gives, per tensor, the energy of the
float activation and of the candidate's error (`onnxopt.kernels.fp16`), so the
SQNR of every intermediate tensor comes from one run per round, in bounded memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import onnx

from onnxopt.data.observe import observe
from onnxopt.data.samples import Sample
from onnxopt.kernels.fp16 import ErrorEnergyObserver, sqnr_db

from .eligibility import FLOAT

PREFIX = "fp16/"
_ERR = "fp16_error/"
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\) node with name '([^']*)'")


def missing_kernel(message: str) -> tuple[str, str] | None:
    """(op type, node name) of the node onnxruntime found no kernel for, from its error message."""
    m = _MISSING_KERNEL.search(message)
    return (m.group(1), m.group(2)) if m else None


def _rename_graph(g: onnx.GraphProto, keep: set[str]) -> None:
    """Prefix every tensor and node name in `g` and its bodies, except the names in `keep`."""

    def new(name: str) -> str:
        return name if not name or name in keep else PREFIX + name

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        vi.name = new(vi.name)
    for init in g.initializer:
        init.name = new(init.name)
    for node in g.node:
        node.name = PREFIX + node.name if node.name else node.name
        node.input[:] = [new(x) for x in node.input]
        node.output[:] = [new(x) for x in node.output]
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_graph(body, keep)


def emulated(model: onnx.ModelProto, half: dict[str, tuple[int, ...]], types: dict[str, int]) -> onnx.ModelProto:
    """`model` with the inputs at converted positions and the float32 outputs of every node in
    `half` rounded to float16 and back (a Cast pair each), names and everything else unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    rounded: dict[str, str] = {}
    for node in out.graph.node:
        slots = half.get(node.name)
        if slots is None:
            nodes.append(node)
            continue
        for i in slots:
            t = node.input[i] if i < len(node.input) else ""
            if t and types.get(t) == FLOAT:
                if t not in rounded:
                    rounded[t] = f"fp16_round/{t}"
                    nodes += _round_trip(t, rounded[t])
                node.input[i] = rounded[t]
        after = []
        for k, o in enumerate(node.output):
            if o and types.get(o) == FLOAT:
                node.output[k] = f"fp16_round/{o}/float"
                after += _round_trip(node.output[k], o)
        nodes += [node] + after
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _round_trip(src: str, dst: str) -> list[onnx.NodeProto]:
    """Cast `src` to float16 and back into `dst`."""
    half = f"{dst}/float16"
    return [
        onnx.helper.make_node("Cast", [src], [half], to=onnx.TensorProto.FLOAT16),
        onnx.helper.make_node("Cast", [half], [dst], to=FLOAT),
    ]


def paired_model(reference: onnx.ModelProto, candidate: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """One model running `reference` and `candidate` side by side on the same inputs, with an
    `fp16_error/<t>` tensor (candidate minus reference, in float32) for each of `tensors`."""
    cand = onnx.GraphProto()
    cand.CopyFrom(candidate.graph)
    _rename_graph(cand, {i.name for i in reference.graph.input})
    out = onnx.ModelProto()
    out.CopyFrom(reference)
    g = out.graph
    g.node.extend(cand.node)
    g.initializer.extend(cand.initializer)
    for t in tensors:
        as_float = f"{_ERR}{t}/float"
        g.node.append(onnx.helper.make_node("Cast", [PREFIX + t], [as_float], to=onnx.TensorProto.FLOAT))
        g.node.append(onnx.helper.make_node("Sub", [as_float, t], [_ERR + t]))
    return out


def tensor_sqnr(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, samples: Iterable[Sample], tensors: list[str]
) -> dict[str, float]:
    """SQNR (dB) of each of `tensors` in `candidate` against `reference` over `samples`; -inf where
    the candidate has NaN or Inf that the reference does not."""
    if not tensors:
        return {}
    model = paired_model(reference, candidate, tensors)
    names = tensors + [_ERR + t for t in tensors]
    obs = observe(model, samples, names, lambda _: ErrorEnergyObserver(), desc="fp16: measuring")
    result = {}
    for t in tensors:
        signal, noise = obs[t], obs[_ERR + t]
        bad = noise.nonfinite > signal.nonfinite
        result[t] = -math.inf if bad else sqnr_db(signal.energy, noise.energy)
    return result
