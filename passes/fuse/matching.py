"""What the transformer fusions share: the target's choice of fused form, and the checks that make a
matched pattern safe to replace (scalar and per-hidden constants, who reads an intermediate, equal
shapes).

Equal shapes are proven from inferred shapes when their dims agree (numbers or the same symbol). ONNX
shape inference names a batch axis anew after a Reshape (`unk__12` vs `unk__8`), so where symbols
differ the model is inferred again at two pinned input shapes (every symbolic input dim a distinct
value other than 1, so a broadcast shows as 1 against n): tensors whose shapes agree at both are
taken as equal. A dim that depends on input values stays unknown there and stops the fusion.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo, infer_tensor_info, tensor_dims
from onnxopt.framework.context import PassContext, register_analysis
from onnxopt.ir.graph import (
    constant_shape,
    constant_value,
    export_structure,
    is_constant,
    new_constant,
    output_owners,
    unique_name,
)
from onnxopt.ir.graph_state import pinned_output_owners
from onnxopt.ir.ops import CONTRIB_DOMAIN, CONTRIB_TARGETS, SINCE_OPSET
from onnxopt.passes.fuse.scope import Scope

#: The size the first symbolic input dim gets in each probe; the next ones get 2, 4, ... more (never 1:
#: a broadcast must show).
_PROBE_BASES = (3, 29)


@dataclass
class FusionTarget:
    """The run's target and opset, which decide each fusion's output form, and what was left decomposed."""

    ctx: PassContext
    root: gs.Graph
    #: note name (e.g. "gelu_left_decomposed") -> names of the anchor nodes left alone.
    left: dict[str, set[str]] = field(default_factory=dict)

    @property
    def contrib(self) -> bool:
        """Whether the target's runtime runs onnxruntime's com.microsoft operators."""
        return self.ctx.target in CONTRIB_TARGETS

    @property
    def opset(self) -> int:
        """The model's default-domain opset version."""
        return int(self.root.opset)

    def has(self, op: str) -> bool:
        """Whether the model's opset has the standard op `op`."""
        return self.opset >= SINCE_OPSET[op]

    def leave(self, sc: Scope, node: gs.Node, note: str, reason: str) -> None:
        """Leave a matched pattern decomposed: list its anchor `node` as skipped and count it under `note`."""
        sc.skip(node, reason)
        self.left.setdefault(note, set()).add(node.name)

    def contrib_node(self, sc: Scope, op: str, base: str, inputs: list, outputs: list, **attrs) -> gs.Node:
        """A new com.microsoft node in `sc`'s graph."""
        return self.new_node(sc, op, base, inputs, outputs, CONTRIB_DOMAIN, **attrs)

    def new_node(
        self, sc: Scope, op: str, base: str, inputs: list, outputs: list, domain: str | None = None, **attrs
    ) -> gs.Node:
        """A new node `op` named after `base`, appended to `sc`'s graph."""
        node = gs.Node(op, unique_name(sc.root, f"{base}_{op}"), attrs, inputs, outputs, domain)
        sc.add(node)
        return node

    def same_shape(self, sc: Scope, a: gs.Tensor, b: gs.Tensor) -> bool:
        """Whether `a` and `b` have the same shape for every input (see the module docstring)."""
        sa, sb = shape_of(sc, a), shape_of(sc, b)
        if sa is not None and sa == sb and all(d is not None for d in sa):
            return True
        if sc.graph is not sc.root or sa is None or sb is None or len(sa) != len(sb):
            return False
        probes = self.ctx.analysis("fuse_probe_shapes", sc.root)
        if not probes:
            return False
        for info in probes:
            ia, ib = info.get(a.name), info.get(b.name)
            if ia is None or ib is None or not ia.static or ia.shape != ib.shape:
                return False
        return True

    def scope(self, sc: Scope) -> Scope:
        """`sc` with the main graph's shapes inferred through com.microsoft ops (`onnxopt.analysis.contrib_shapes`)."""
        if sc.graph is not sc.root:
            return sc
        return replace(sc, shapes=self.ctx.analysis("fuse_shapes", sc.root))


@register_analysis("fuse_shapes")
def fuse_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, TensorInfo]:
    """Inferred shapes of the main graph at its own input shapes, through com.microsoft ops."""
    return infer_tensor_info(export_structure(graph))


@register_analysis("fuse_probe_shapes")
def probe_shapes(graph: gs.Graph, ctx: PassContext) -> tuple[dict[str, TensorInfo], ...]:
    """Inferred shapes of the main graph at two pinned input shapes (through com.microsoft ops); empty
    when no input is dynamic."""
    model = export_structure(graph)
    probes = [_probe_inputs(model.graph.input, {i.name for i in model.graph.initializer}, s) for s in _PROBE_BASES]
    if not probes[0]:
        return ()
    return tuple(infer_tensor_info(model, p) for p in probes)


def _probe_inputs(inputs: Iterable[onnx.ValueInfoProto], inits: set[str], base: int) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the dynamic tensor inputs: the same symbol gets the same size, other
    unknown dims each a new one; {} when no input is dynamic."""
    given: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dynamic = False
    for inp in inputs:
        if inp.name in inits or inp.type.WhichOneof("value") != "tensor_type":
            continue
        dims = tensor_dims(inp.type.tensor_type)
        if dims is None:
            continue
        out = []
        for d in dims:
            if isinstance(d, int) and d > 0:
                out.append(d)
                continue
            dynamic = True
            key = d if isinstance(d, str) else f"?{len(given)}"
            if key not in given:
                given[key] = base + 2 * len(given)
            out.append(given[key])
        shapes[inp.name] = tuple(out)
    return shapes if dynamic else {}


def shape_of(sc: Scope, t: gs.Tensor) -> tuple | None:
    """The shape of `t`: inferred (main graph), else as declared (bodies), else None."""
    info = sc.shapes.get(t.name)
    if info is not None and info.shape is not None:
        return tuple(info.shape)
    return tuple(t.shape) if t.shape is not None else None


def last_dim(sc: Scope, t: gs.Tensor) -> int | None:
    """The size of `t`'s last axis when it is a known number."""
    s = shape_of(sc, t)
    return s[-1] if s and isinstance(s[-1], int) and s[-1] > 0 else None


def read_only_by(sc: Scope, t: gs.Tensor, nodes: Iterable[gs.Node]) -> bool:
    """Whether `nodes` (of this graph) are all the consumers of `t`, and `t` is no output of any graph."""
    owners = pinned_output_owners(sc.root)
    if owners is None:
        owners = output_owners(sc.root)
    want = {id(n) for n in nodes}
    return id(t) not in owners and {id(n) for n in t.outputs} == want and all(sc.owns(n) for n in t.outputs)


def only_reader(sc: Scope, t: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
    """The single consumer of `t` if it is an `op` of this graph and `t` is no graph output."""
    ops = (op,) if isinstance(op, str) else op
    if len({id(n) for n in t.outputs}) != 1 or t.outputs[0].op not in ops or not read_only_by(sc, t, t.outputs[:1]):
        return None
    return t.outputs[0]


def made_by(sc: Scope, t: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
    """The producer of `t` if it is an `op` of this graph."""
    ops = (op,) if isinstance(op, str) else op
    p = t.inputs[0] if t.inputs else None
    return p if p is not None and p.op in ops and sc.owns(p) else None


def f32_constant(t: gs.Tensor) -> np.ndarray | None:
    """The value of a float32 constant tensor, else None."""
    if not is_constant(t):
        return None
    v = constant_value(t)
    return v if v is not None and v.dtype == np.float32 else None


def scalar_operand(sc: Scope, node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """(the other input, the value) of a binary node with one float32 constant of one value that cannot
    raise the other input's rank: 0-d, or of rank at most the other input's known rank."""
    if len(node.inputs) != 2:
        return None
    for k in (0, 1):
        v, x = f32_constant(node.inputs[k]), node.inputs[1 - k]
        if v is None or v.size != 1 or is_constant(x):
            continue
        rank = sc.rank(x)
        if v.ndim == 0 or (rank is not None and v.ndim <= rank):
            return x, float(v.reshape(-1)[0])
    return None


def is_value(sc: Scope, node: gs.Node, target: float, rtol: float = 1e-6) -> gs.Tensor | None:
    """The non-constant input of a binary `node` whose other input is a scalar close to `target`."""
    found = scalar_operand(sc, node)
    return found[0] if found is not None and np.isclose(found[1], target, rtol=rtol, atol=0.0) else None


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The input of a binary `node` that is not `t` (`t` itself for `op(t, t)`); None if `t` is not read."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is t:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is t else None


def hidden_vector(t: gs.Tensor, hidden: int, rank: int | None) -> np.ndarray | None:
    """A float32 constant that scales or shifts the last axis only (one value, or shape [..1.., H]; of
    rank at most the data's), as a 1-D array of `hidden` values; None otherwise."""
    v = f32_constant(t)
    if v is None or v.ndim > max(1, rank or 1):
        return None
    if v.size != 1 and (v.shape[-1] != hidden or v.size != hidden):
        return None
    return np.broadcast_to(v.reshape(-1), (hidden,)).astype(np.float32)


def hidden_input(sc: Scope, t: gs.Tensor | None, value: np.ndarray, base: str) -> gs.Tensor:
    """`t` itself when it already holds `value` as a 1-D constant, else a new constant of `value`."""
    if t is not None and constant_shape(t) == value.shape:
        return t
    return new_constant(sc.root, unique_name(sc.root, base), value)
