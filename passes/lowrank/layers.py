"""The layers the lowrank pass can factorize: what a layer is (`Layer`: y = x W + b as an m x n matrix
product), how it is found in the graph (MatMul, Gemm, 1x1 Conv with a constant float weight), and
layers reading one input merged to share their first factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value
from onnxopt.ir.ops import ops_where, out_channel_axis
from onnxopt.kernels.lowrank import max_useful_rank
from onnxopt.kernels.quant import all_finite
from onnxopt.verify.accuracy_guard import nodes_by_output

_FLOATS = (np.float16, np.float32, np.float64)
#: The op types whose constant weight is a matrix product (Conv: only 1x1, see `_conv_layer`).
FACTORIZABLE_OPS = ops_where("factorizable")


@dataclass
class Layer:
    """One factorizable layer: y = x W (+ bias), W the effective m x n matrix (alpha and transB applied)."""

    node: gs.Node
    kind: str  # "MatMul" | "Gemm" | "Conv"
    x: gs.Tensor
    W: np.ndarray  # float64, m x n
    dtype: np.dtype
    layout: str  # how rows of x are read: "last" | "channel" | "transposed"
    bias: np.ndarray | None = None  # effective bias of length n, when it can be rewritten
    bias_add: gs.Node | None = None  # the Add holding a MatMul's bias
    can_add_bias: bool = False  # a (corrected) bias can be written even if there is none
    out: gs.Tensor | None = None  # the layer's output (after the bias Add)
    in_shape: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()  # a 1x1 Conv's kernel shape (all ones)
    curve: np.ndarray | None = None
    rank: int = 0
    cap: int = 0
    row: dict[str, Any] = field(default_factory=dict)
    #: Layers sharing one first factor (a group reading the same input); empty for a single layer.
    members: list[Layer] = field(default_factory=list)
    #: The factors (A, B) and the bias to write (None: keep the layer's own), once the rank is final.
    factors: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    @property
    def m(self) -> int:
        """Input width (rows of W)."""
        return self.W.shape[0]

    @property
    def n(self) -> int:
        """Output width (columns of W)."""
        return self.W.shape[1]

    @property
    def output(self) -> gs.Tensor:
        """`out`, which every layer found in a graph has (None is only the field's default)."""
        assert self.out is not None, f"no output for {self.node.name}"
        return self.out

    @property
    def computed_curve(self) -> np.ndarray:
        """`curve`, which the pass computes for every layer it keeps before choosing any rank."""
        assert self.curve is not None, f"no error curve for {self.node.name}"
        return self.curve


def has_bias(L: Layer) -> bool:
    """Does the layer (any member of a shared group) add a bias?"""
    return any(M.bias is not None or (M.kind == "Gemm" and len(M.node.inputs) > 2) for M in L.members or [L])


def skip_rows(L: Layer, reason: str) -> list[dict[str, str]]:
    """The `skipped` rows of a layer left dense (one per member of a shared group)."""
    return [{"node": M.node.name, "op": M.kind, "reason": reason} for M in L.members or [L]]


# ---------------------------------------------------------------- finding layers
def collect_layers(graph: gs.Graph, ops: list[str], min_params: int, skipped: list[dict[str, str]]) -> list[Layer]:
    """The factorizable layers among `ops` with at least `min_params` weight parameters; the others
    that were candidates go to `skipped` with the reason."""
    layers = []
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if node.op not in FACTORIZABLE_OPS or node.op not in ops:
            continue
        why, layer = _layer(node, outputs)
        if layer is None:
            if why:
                skipped.append({"node": node.name, "op": node.op, "reason": why})
            continue
        why = _too_small(layer, min_params)
        if why:
            skipped.append({"node": node.name, "op": node.op, "reason": why})
            continue
        layers.append(layer)
    return layers


def _too_small(layer: Layer, min_params: int) -> str:
    """Why factorizing the layer cannot pay ("" if it can)."""
    if layer.m * layer.n < min_params:
        return f"weight {layer.m}x{layer.n} below min_params={min_params}"
    if max_useful_rank(layer.m, layer.n) < 1:
        return "no rank saves parameters"
    return ""


def _layer(node: gs.Node, graph_outputs: set[int]) -> tuple[str, Layer | None]:
    """(reason, None) when the node is not a factorizable layer, else ("", layer)."""
    if len(node.inputs) < 2 or len(node.outputs) != 1:
        return "unexpected arity", None
    w = constant_value(node.inputs[1])
    if w is None:
        return "weight is not a constant", None
    w = np.asarray(w)
    if w.dtype.type not in _FLOATS:
        return f"weight dtype {w.dtype} is not float", None
    if not all_finite(w):
        return "weight holds inf/NaN: left dense", None
    if node.op == "MatMul":
        return _matmul_layer(node, w, graph_outputs)
    if node.op == "Gemm":
        return _gemm_layer(node, w)
    return _conv_layer(node, w)


def _matrix(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The 2-D weight as the m x n matrix x is multiplied by: output channels on the second axis."""
    return w.T if out_channel_axis(node) == 0 else w


def _matmul_layer(node: gs.Node, w: np.ndarray, graph_outputs: set[int]) -> tuple[str, Layer | None]:
    if w.ndim != 2:
        return f"weight is {w.ndim}-D, not 2-D", None
    L = Layer(node, "MatMul", node.inputs[0], _matrix(node, w).astype(np.float64), w.dtype, "last", out=node.outputs[0])
    _matmul_bias(L, graph_outputs)
    return "", L


def _gemm_layer(node: gs.Node, w: np.ndarray) -> tuple[str, Layer | None]:
    if w.ndim != 2:
        return "Gemm weight is not 2-D", None
    a = node.attrs
    W = _matrix(node, w).astype(np.float64) * float(a.get("alpha", 1.0))
    layout = "transposed" if a.get("transA", 0) else "last"
    L = Layer(node, "Gemm", node.inputs[0], W, w.dtype, layout, out=node.outputs[0])
    if len(node.inputs) < 3 or not node.inputs[2].name:
        L.can_add_bias = True
        return "", L
    c = constant_value(node.inputs[2])
    c = None if c is None else np.asarray(c, np.float64)
    # A per-column bias ([n], [1, n] or a scalar) can take the correction; a per-row C cannot.
    if c is not None and c.size in (1, L.n) and (c.ndim < 2 or c.shape[0] == 1):
        L.bias = np.broadcast_to(c.reshape(-1), (L.n,)) * float(a.get("beta", 1.0))
        L.can_add_bias = True
    return "", L


def _conv_layer(node: gs.Node, w: np.ndarray) -> tuple[str, Layer | None]:
    """Conv: only 1x1, group 1, stride 1, no padding is a matrix product over channels."""
    if w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return "", None
    why = _conv_unsupported(node.attrs)
    if why:
        return why, None
    W = _matrix(node, w.reshape(w.shape[0], w.shape[1])).astype(np.float64)
    L = Layer(
        node,
        "Conv",
        node.inputs[0],
        W,
        w.dtype,
        "channel",
        out=node.outputs[0],
        can_add_bias=True,
        spatial=tuple(w.shape[2:]),
    )
    if len(node.inputs) > 2 and node.inputs[2].name:
        b = constant_value(node.inputs[2])
        if b is None:
            return "conv bias is not a constant", None
        L.bias = np.asarray(b, np.float64).reshape(-1)
    return "", L


def _conv_unsupported(a: dict[str, Any]) -> str:
    """Why a 1x1 Conv with attributes `a` is not a plain matrix product ("" if it is)."""
    if a.get("group", 1) != 1:
        return "grouped 1x1 conv"
    if any(s != 1 for s in a.get("strides", [1])) or any(p != 0 for p in a.get("pads", [0])):
        return "1x1 conv with stride or padding"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return "unknown auto_pad"
    return ""


def _matmul_bias(L: Layer, graph_outputs: set[int]) -> None:
    """Adopt the constant bias of an Add that is the MatMul output's only consumer."""
    y = L.node.outputs[0]
    if id(y) in graph_outputs or len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return
    add = y.outputs[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    b = constant_value(other)
    if b is None or add.inputs[0] is add.inputs[1]:
        return
    b = np.asarray(b)
    if b.size != L.n or b.shape[-1] != L.n or b.ndim > max(len(L.x.shape or ()), 1):
        return
    L.bias, L.bias_add, L.out, L.can_add_bias = b.astype(np.float64).reshape(-1), add, add.outputs[0], True


# ---------------------------------------------------------------- groups and copies
def share_input(layers: list[Layer]) -> list[Layer]:
    """Merge MatMul/Gemm layers reading the same input into one layer over the columns of [W1 W2 ...]."""
    groups: dict[tuple, list[Layer]] = {}
    for L in layers:
        key = (L.x.name, L.kind, L.layout, np.dtype(L.dtype).name) if L.kind in ("MatMul", "Gemm") else (id(L),)
        groups.setdefault(key, []).append(L)
    return [members[0] if len(members) == 1 else _merged(members) for members in groups.values()]


def _merged(members: list[Layer]) -> Layer:
    """One layer over the concatenated columns of `members` (which read the same input)."""
    first = members[0]
    can_bias = all(M.can_add_bias for M in members)
    bias = (
        np.concatenate([M.bias if M.bias is not None else np.zeros(M.n) for M in members])
        if can_bias and any(M.bias is not None for M in members)
        else None
    )
    return Layer(
        first.node,
        first.kind,
        first.x,
        np.hstack([M.W for M in members]),
        first.dtype,
        first.layout,
        bias=bias,
        can_add_bias=can_bias,
        members=members,
    )


def rebind(L: Layer, graph: gs.Graph) -> Layer:
    """The same layer (factors included) bound to the nodes and tensors of a re-imported copy of its graph."""
    nodes = nodes_by_output(graph)
    tensors = graph.tensors()

    def bind(M: Layer) -> Layer:
        return replace(
            M,
            node=nodes[M.node.outputs[0].name],
            x=tensors[M.x.name],
            bias_add=None if M.bias_add is None else nodes[M.bias_add.outputs[0].name],
            out=None if M.out is None else tensors[M.out.name],
            row={},
            members=[bind(N) for N in M.members],
        )

    return bind(L)
