"""Rewrite a graph so that chosen nodes compute in float16, with Casts where float32 and float16 meet.

The plan names the nodes that run in float16 and, for each, the input positions
that take the compute type (`eligibility`). Their float32 outputs become float16
tensors; their float32 weights become float16 initializers (a weight also read in
float32 elsewhere gets a float16 copy); every other crossing gets one Cast per
tensor and direction, shared by all its readers. Graph outputs and tensors that a
control-flow body reads from outside keep their name and float32 type: the node
writes a float16 twin and a Cast restores the float32 tensor (keep_io_types).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, is_constant, iter_graphs, new_constant, producer, subgraphs_of, unique_name

from .eligibility import FLOAT, FLOAT16


def pinned_names(graph: gs.Graph) -> set[str]:
    """Names that must stay float32 under their own name: graph outputs and tensors bodies read."""
    names = {t.name for t in graph.outputs}
    for node in graph.nodes:
        for body in subgraphs_of(node):
            for g in iter_graphs(body):
                names.update(t.name for n in g.nodes for t in n.inputs if t.name)
    return names


class _Converter:
    """One conversion of `graph` following `plan` ({node name: converted input positions})."""

    def __init__(self, graph: gs.Graph, plan: Mapping[str, tuple[int, ...]], elem_types: Mapping[str, int]):
        self.graph = graph
        self.plan = plan
        self.types = elem_types
        self.pinned = pinned_names(graph)
        self.half: dict[str, gs.Tensor] = {}  # float32 tensor name -> its float16 form
        self.full: dict[str, gs.Tensor] = {}  # float16 tensor name -> its float32 form
        self.casts = 0
        self.weights = 0

    def run(self) -> None:
        nodes = list(self.graph.nodes)
        for node in nodes:
            if node.name in self.plan:
                self._convert_outputs(node)
        for node in nodes:
            slots = set(self.plan.get(node.name, ()))
            for i, t in enumerate(list(node.inputs)):
                if not t.name:
                    continue
                if i in slots and self.types.get(t.name) == FLOAT:
                    node.inputs[i] = self._half_of(t, node)
                elif t.name in self.full:
                    node.inputs[i] = self._float_of(t)

    def _convert_outputs(self, node: gs.Node) -> None:
        for i, t in enumerate(list(node.outputs)):
            if not t.name or self.types.get(t.name) != FLOAT:
                continue
            if t.name in self.pinned:
                twin = gs.Variable(unique_name(self.graph, f"{t.name}_fp16"), np.float16)
                node.outputs[i] = twin
                self._cast(twin, FLOAT, into=t)
                self.half[t.name] = twin
            else:
                t.dtype = np.float16
                self.half[t.name] = t
                self.full[t.name] = t

    def _half_of(self, t: gs.Tensor, reader: gs.Node) -> gs.Tensor:
        if t.name in self.half:
            return self.half[t.name]
        value = constant_value(t) if is_constant(t) else None
        if value is not None and value.dtype == np.float32:
            self.weights += 1
            half = value.astype(np.float16)
            if t.name not in self.pinned and all(self._reads_half(n, t) for n in t.outputs):
                _set_value(t, half)
                self.half[t.name] = t
                return t
            self.half[t.name] = new_constant(self.graph, unique_name(self.graph, f"{t.name}_fp16"), half)
            return self.half[t.name]
        self.half[t.name] = self._cast(t, FLOAT16)
        return self.half[t.name]

    def _reads_half(self, node: gs.Node, t: gs.Tensor) -> bool:
        slots = self.plan.get(node.name, ())
        return node.name in self.plan and all(i in slots for i, x in enumerate(node.inputs) if x is t)

    def _float_of(self, t: gs.Tensor) -> gs.Tensor:
        found = self.full[t.name]
        if found is t:
            self.full[t.name] = self._cast(t, FLOAT)
        return self.full[t.name]

    def _cast(self, src: gs.Tensor, to: int, into: gs.Tensor | None = None) -> gs.Tensor:
        dtype = np.float16 if to == FLOAT16 else np.float32
        suffix = "fp16" if to == FLOAT16 else "fp32"
        out = into or gs.Variable(unique_name(self.graph, f"{src.name}_{suffix}"), dtype)
        name = unique_name(self.graph, f"Cast_{out.name}")
        self.graph.nodes.append(gs.Node("Cast", name, {"to": to}, inputs=[src], outputs=[out]))
        self.casts += 1
        return out


def _set_value(t: gs.Tensor, value: np.ndarray) -> None:
    """Store `value` in the initializer or Constant node that defines `t`."""
    if isinstance(t, gs.Constant):
        t.values = value
        return
    node = producer(t)
    assert node is not None and node.op == "Constant", "is_constant: an initializer or a Constant node"
    node.attrs = {"value": gs.Constant(f"{t.name}_value", value)}
    t.dtype = np.float16


def convert(graph: gs.Graph, plan: Mapping[str, tuple[int, ...]], elem_types: Mapping[str, int]) -> dict[str, int]:
    """Make the nodes of `plan` compute in float16 (see the module doc); returns counts for the report."""
    c = _Converter(graph, plan, elem_types)
    c.run()
    return {"fp16_nodes": len(plan), "casts_inserted": c.casts, "fp16_weights": c.weights}
