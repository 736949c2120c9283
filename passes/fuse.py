"""Operator fusion: fold affine per-channel ops into the weights of the op before them.

Rewrites, repeated until none applies:
- BatchNormalization (inference) after Conv / ConvTranspose / Gemm -> new weights and bias;
- Mul / Add by a per-channel constant after Conv / ConvTranspose / Gemm -> weights and bias;
- Mul / Add by a per-channel constant after BatchNormalization -> the BN's scale and bias;
- MatMul(2-D x, constant W) + Add(constant bias) -> Gemm;
- Mul-Mul and Add-Add chains of constants -> one op.
A rewrite applies only when the intermediate tensor has no other consumer and is
not a graph output, when every node it joins lives in the same graph (main graph
or one If/Loop/Scan body: a body may run many times or not at all, so nothing is
moved across that boundary; tensors a body reads from outside count as consumers),
and when the result has exactly the shape of what it replaces. Everything else is
left as it is; BatchNormalizations that cannot be folded are listed with why.
Numbers: `onnxopt.kernels.fusion`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (cleanup, constant_shape, constant_value, detach, is_constant, iter_graphs, new_constant,
                           output_owners, replace_all_uses, unique_name)
from onnxopt.kernels.fusion import affine_bias, bn_affine, per_channel, scale_output_channels
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.registry import register_pass
from onnxopt.shapes import TensorInfo

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


@register_pass("fuse")
class FuseOperators(Pass):
    """Fold BatchNorm and per-channel Mul/Add into Conv/ConvTranspose/Gemm; MatMul+Add into Gemm."""

    tolerance = "exact"

    @dataclass
    class Options:
        batchnorm: bool = option(True, "fold BatchNormalization into the Conv/ConvTranspose/Gemm before it")
        affine: bool = option(True, "fold per-channel Mul/Add constants into weights, biases or BN")
        gemm: bool = option(True, "turn MatMul(2-D x, constant W) + Add(constant) into Gemm")
        max_iterations: int = option(10, "stop after this many rounds", low=1)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {"batchnorm_folded": 0, "affine_folded": 0, "matmul_add_to_gemm": 0, "chains_merged": 0,
                  "in_subgraphs": 0}
        skipped: dict[str, dict[str, str]] = {}
        changed = False
        for _ in range(self.options.max_iterations):
            step = 0
            shapes = ctx.analysis("shapes", graph)
            graph._onnxopt_owners = output_owners(graph)  # output tensors keep their identity within a round
            for g in list(iter_graphs(graph)):
                sc = _Scope(graph, g, {id(n) for n in g.nodes}, shapes, skipped)
                for node in list(g.nodes):
                    if not node.outputs or not node.inputs:
                        continue  # removed earlier in this round
                    kind = self._fuse_one(sc, node)
                    if kind:
                        counts[kind] += 1
                        counts["in_subgraphs"] += g is not graph
                        step += 1
            if not step:
                break
            changed = True
            cleanup(graph)
            ctx.invalidate()
        graph._onnxopt_owners = None
        reason = "" if changed else ("nothing to fuse: no BatchNormalization, Mul/Add into a neighbouring layer "
                                     "or chain, or MatMul+Add that can be merged"
                                     + (f" ({len(skipped)} left alone, see skipped)" if skipped else ""))
        return PassResult(changed=changed, stats=counts, skipped=list(skipped.values()), reason=reason)

    def _fuse_one(self, sc: "_Scope", node: gs.Node) -> str | None:
        """Apply the first rewrite that fits `node`; the name of its counter, or None."""
        o = self.options
        if node.op == "BatchNormalization" and o.batchnorm and _fold_bn(sc, node):
            return "batchnorm_folded"
        if node.op in ("Mul", "Add") and o.affine and _fold_affine(sc, node):
            return "affine_folded"
        if node.op in ("Mul", "Add") and o.affine and _merge_chain(sc, node):
            return "chains_merged"
        if node.op == "MatMul" and o.gemm and _matmul_add_to_gemm(sc, node):
            return "matmul_add_to_gemm"
        return None


@dataclass
class _Scope:
    """One graph being fused: `root` (names, outputs of every graph), `graph` (where nodes are added),
    the ids of the nodes that belong to it, the inferred shapes, and the skipped list."""

    root: gs.Graph
    graph: gs.Graph
    local: set[int]
    shapes: dict[str, TensorInfo]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    def owns(self, node: gs.Node | None) -> bool:
        return node is not None and id(node) in self.local

    def add(self, node: gs.Node) -> None:
        self.graph.nodes.append(node)
        self.local.add(id(node))

    def skip(self, node: gs.Node, reason: str) -> None:
        self.skipped[node.name] = {"node": node.name, "op": node.op, "reason": reason}

    def rank(self, t: gs.Tensor) -> int | None:
        """Rank of `t`: inferred (main graph), else as declared in the model (bodies), else None."""
        info = self.shapes.get(t.name)
        if info is not None and info.shape is not None:
            return len(info.shape)
        return len(t.shape) if t.shape is not None else None


def _sole_consumer(sc: _Scope, t: gs.Tensor) -> gs.Node | None:
    """The only consumer of `t`, if it has exactly one, in this graph, and `t` is no output of any graph."""
    owners = getattr(sc.root, "_onnxopt_owners", None)
    if owners is None:
        owners = output_owners(sc.root)
    if len(t.outputs) != 1 or id(t) in owners or not sc.owns(t.outputs[0]):
        return None
    return t.outputs[0]


def _weighted_producer(sc: _Scope, t: gs.Tensor) -> gs.Node | None:
    """The Conv/ConvTranspose/Gemm of this graph producing `t` with constant weights, if `t` feeds only one node."""
    if not t.inputs or _sole_consumer(sc, t) is None:
        return None
    p = t.inputs[0]
    if not sc.owns(p) or p.op not in WEIGHTED or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
        return None
    if len(p.inputs) > 2 and p.inputs[2].name and not is_constant(p.inputs[2]):
        return None
    if p.op == "Gemm" and p.attrs.get("transA", 0) not in (0, 1):
        return None
    return p


def _out_channels(p: gs.Node, w: np.ndarray) -> tuple[int, int, int]:
    """(output channel count, weight axis of output channels, groups) of a weighted op."""
    if p.op == "Conv":
        return w.shape[0], 0, 1
    if p.op == "ConvTranspose":
        g = int(p.attrs.get("group", 1))
        return w.shape[1] * g, 1, g
    trans_b = int(p.attrs.get("transB", 0))
    return (w.shape[0], 0, 1) if trans_b else (w.shape[1], 1, 1)


def _apply_affine(sc: _Scope, p: gs.Node, a: np.ndarray | None, c: np.ndarray | None) -> None:
    """Rewrite weighted op `p` so that its output becomes out * a + c (per channel)."""
    w = constant_value(p.inputs[1])
    channels, axis, groups = _out_channels(p, w)
    a = np.ones(channels) if a is None else a
    c = np.zeros(channels) if c is None else c
    b = constant_value(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2].name else None
    w_scale = a
    if p.op == "Gemm":  # y = alpha * x @ W + beta * b  ->  alpha and beta go into W and b
        alpha, beta = float(p.attrs.get("alpha", 1.0)), float(p.attrs.get("beta", 1.0))
        w_scale = a * alpha
        b = None if b is None else b.astype(np.float64) * beta
        p.attrs["alpha"], p.attrs["beta"] = 1.0, 1.0
    new_w = scale_output_channels(w, w_scale, axis, groups)
    new_b = affine_bias(None if b is None else b.reshape(-1), a, c, channels, w.dtype)
    p.inputs[1] = new_constant(sc.root, unique_name(sc.root, f"{p.name or p.op}_W_fused"), new_w)
    bias = gs.Constant(unique_name(sc.root, f"{p.name or p.op}_B_fused"), new_b)
    if len(p.inputs) > 2:
        p.inputs[2] = bias
    else:
        p.inputs.append(bias)


def _gemm_bias_ok(p: gs.Node) -> bool:
    """Gemm bias must be per-output-column ([N], [1, N]) or absent to absorb a per-channel affine."""
    if p.op != "Gemm" or len(p.inputs) < 3 or not p.inputs[2].name:
        return True
    b = constant_value(p.inputs[2])
    return b is not None and (b.ndim == 1 or (b.ndim == 2 and b.shape[0] == 1))


def _bypass(sc: _Scope, node: gs.Node, replacement: gs.Tensor) -> None:
    """Remove `node` (single output) and make its consumers read `replacement`."""
    out = node.outputs[0]
    prod = replacement.inputs[0] if replacement.inputs else None
    if prod is not None and len(replacement.outputs) == 1 and replacement.outputs[0] is node:
        detach(node)  # the fused op now produces the old output tensor itself: names stay
        k = next(i for i, t in enumerate(prod.outputs) if t is replacement)
        prod.outputs[k] = out
        return
    replace_all_uses(sc.root, out, replacement, getattr(sc.root, "_onnxopt_owners", None))
    detach(node)


def _split_shared_producer(sc: _Scope, bn: gs.Node) -> None:
    """If a weighted op feeds only BatchNorms (several) of its own graph, give `bn` its own copy of that op.

    Each BatchNorm then folds into its copy: k BNs + 1 op become k ops.
    """
    t = bn.inputs[0]
    if not t.inputs or len(t.outputs) < 2 or id(t) in (getattr(sc.root, "_onnxopt_owners", None) or {}):
        return
    if not all(c.op == "BatchNormalization" and sc.owns(c) for c in t.outputs):
        return
    p = t.inputs[0]
    if not sc.owns(p) or p.op not in WEIGHTED or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
        return
    if any(o is t for o in sc.graph.outputs):
        return
    out = gs.Variable(unique_name(sc.root, f"{t.name}_{bn.name}"), dtype=t.dtype, shape=t.shape)
    sc.add(gs.Node(p.op, name=unique_name(sc.root, f"{p.name}_{bn.name}"), attrs=dict(p.attrs), domain=p.domain,
                   inputs=list(p.inputs), outputs=[out]))
    bn.inputs[0] = out


def _bn_params(sc: _Scope, bn: gs.Node) -> list[np.ndarray] | None:
    """The constant scale, bias, mean and variance of an inference BatchNormalization, one value per
    channel; None (with the reason in the skipped list) when they are not."""
    if len(bn.inputs) < 5 or len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return None
    if int(bn.attrs.get("spatial", 1)) == 0:
        sc.skip(bn, "spatial=0 (opset < 9): statistics per element, not per channel")
        return None
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if any(v is None for v in params):
        return None
    if any(v.ndim != 1 or v.shape != params[0].shape or v.dtype.kind != "f" for v in params):
        sc.skip(bn, "scale, bias, mean and variance are not float vectors of one value per channel")
        return None
    return params


def _fold_bn(sc: _Scope, bn: gs.Node) -> bool:
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return False
    params = _bn_params(sc, bn)
    if params is None:
        return False
    _split_shared_producer(sc, bn)
    p = _weighted_producer(sc, bn.inputs[0])
    if p is None or not _gemm_bias_ok(p):
        return False
    channels, _, _ = _out_channels(p, constant_value(p.inputs[1]))
    if params[0].shape[0] != channels:
        sc.skip(bn, f"{params[0].shape[0]} statistics for the {channels} channels of {p.name}")
        return False
    a, c = bn_affine(*params, float(bn.attrs.get("epsilon", 1e-5)))
    _apply_affine(sc, p, a, c)
    _bypass(sc, bn, p.outputs[0])
    return True


def _const_operand(node: gs.Node) -> tuple[gs.Tensor, np.ndarray] | None:
    """(dynamic operand, constant value) of a binary Mul/Add with one constant float input."""
    if len(node.inputs) != 2:
        return None
    c0, c1 = is_constant(node.inputs[0]), is_constant(node.inputs[1])
    if c0 == c1:
        return None
    v0 = constant_value(node.inputs[0]) if c0 else None
    v1 = constant_value(node.inputs[1]) if c1 else None
    x, v = (node.inputs[1], v0) if v0 is not None else (node.inputs[0], v1)
    if v is None or v.dtype.kind != "f":
        return None
    return x, v


def _fold_affine(sc: _Scope, node: gs.Node) -> bool:
    """Mul/Add by a per-channel constant after a weighted op or a BatchNormalization."""
    found = _const_operand(node)
    if found is None:
        return False
    x, v = found
    if not x.inputs or _sole_consumer(sc, x) is None or not sc.owns(x.inputs[0]):
        return False
    p = x.inputs[0]
    if p.op in WEIGHTED:
        if _weighted_producer(sc, x) is None or not _gemm_bias_ok(p):
            return False
        w = constant_value(p.inputs[1])
        channels, _, _ = _out_channels(p, w)
        rank = 2 if p.op == "Gemm" else w.ndim
        vec = per_channel(v, rank, 1, channels)
        if vec is None or _broadcast_grows(v, rank):
            return False
        if node.op == "Mul":
            _apply_affine(sc, p, vec, None)
        else:
            _apply_affine(sc, p, None, vec)
        _bypass(sc, node, p.outputs[0])
        return True
    if p.op == "BatchNormalization" and len(p.outputs) == 1:
        params = _bn_params(sc, p)
        if params is None:
            return False
        channels = params[0].shape[0]
        rank = sc.rank(x)
        if rank is None:  # rank unknown: only a single value is sure to act per channel and keep the shape
            vec = np.full(channels, float(v.reshape(-1)[0])) if v.size == 1 and v.ndim <= 1 else None
        else:
            vec = per_channel(v, rank, 1, channels) if rank >= 2 and not _broadcast_grows(v, rank) else None
        if vec is None:
            return False
        scale, bias = params[0].astype(np.float64), params[1].astype(np.float64)
        if node.op == "Mul":
            scale, bias = scale * vec, bias * vec
        else:
            bias = bias + vec
        dt = params[0].dtype
        p.inputs[1] = gs.Constant(unique_name(sc.root, f"{p.name or 'bn'}_scale_fused"), scale.astype(dt))
        p.inputs[2] = gs.Constant(unique_name(sc.root, f"{p.name or 'bn'}_bias_fused"), bias.astype(dt))
        _bypass(sc, node, p.outputs[0])
        return True
    return False


def _broadcast_grows(v: np.ndarray, rank: int) -> bool:
    """True if adding `v` would raise the output's rank (then the op is not shape-preserving)."""
    return v.ndim > rank


def _merge_chain(sc: _Scope, node: gs.Node) -> bool:
    """Mul(Mul(x, a), b) -> Mul(x, a*b) and Add(Add(x, a), b) -> Add(x, a+b) for constants."""
    found = _const_operand(node)
    if found is None:
        return False
    x, v2 = found
    if not x.inputs or x.inputs[0].op != node.op or not sc.owns(x.inputs[0]) or _sole_consumer(sc, x) is None:
        return False
    inner = x.inputs[0]
    found_inner = _const_operand(inner)
    if found_inner is None:
        return False
    y, v1 = found_inner
    merged = (v1.astype(np.float64) * v2) if node.op == "Mul" else (v1.astype(np.float64) + v2)
    if merged.ndim > max(v1.ndim, v2.ndim) or merged.size > max(v1.size, v2.size):
        return False  # would materialize a larger broadcast constant
    dtype = np.result_type(v1.dtype, v2.dtype)
    node.inputs[0] = y
    node.inputs[1] = new_constant(sc.root, unique_name(sc.root, f"{node.name or node.op}_merged"),
                                  merged.astype(dtype))
    detach(inner)
    return True


def _matmul_add_to_gemm(sc: _Scope, mm: gs.Node) -> bool:
    """MatMul(x [M, K], W [K, N]) followed by Add(bias [N], [1, N] or one value of rank <= 2) becomes one Gemm.

    The Add's output must keep the MatMul's shape [M, N]: a bias of higher rank
    (even of size 1) would broadcast the result to more axes than Gemm writes.
    """
    w_shape = constant_shape(mm.inputs[1])
    if w_shape is None or len(w_shape) != 2 or sc.rank(mm.inputs[0]) != 2:
        return False
    add = _sole_consumer(sc, mm.outputs[0])
    if add is None or add.op != "Add":
        return False
    found = _const_operand(add)
    if found is None or found[0] is not mm.outputs[0]:
        return False
    bias = found[1]
    n = w_shape[1]
    if bias.ndim > 2 or not (bias.shape in ((n,), (1, n)) or bias.size == 1):
        return False
    bias_vec = np.broadcast_to(bias.reshape(-1), (n,)).astype(bias.dtype)
    x, w_t, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
    c = gs.Constant(unique_name(sc.root, f"{add.name or 'bias'}_C"), bias_vec)
    for node in (add, mm):
        detach(node)
    sc.add(gs.Node("Gemm", name=unique_name(sc.root, f"{mm.name or 'MatMul'}_gemm"), inputs=[x, w_t, c],
                   outputs=[out]))
    return True
