"""Operator fusion: fold affine per-channel ops into the weights of the op before them.

Rewrites, repeated until none applies:
- BatchNormalization (inference) after Conv / ConvTranspose / Gemm -> new weights and bias;
- Mul / Add by a per-channel constant after Conv / ConvTranspose / Gemm -> weights and bias;
- Mul / Add by a per-channel constant after BatchNormalization -> the BN's scale and bias;
- MatMul(2-D x, constant W) + Add(constant bias) -> Gemm;
- Mul-Mul and Add-Add chains of constants -> one op.
A rewrite applies only when the intermediate tensor has no other consumer and is
not a graph output; everything else is left as it is. Numbers: `onnxopt.kernels.fusion`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import (cleanup, constant_shape, constant_value, detach, is_constant, new_constant, output_owners,
                           replace_all_uses, unique_name)
from onnxopt.kernels.fusion import affine_bias, bn_affine, per_channel, scale_output_channels
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.registry import register_pass

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
        max_iterations: int = option(10, "stop after this many rounds")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {"batchnorm_folded": 0, "affine_folded": 0, "matmul_add_to_gemm": 0, "chains_merged": 0}
        changed = False
        for _ in range(self.options.max_iterations):
            step = 0
            shapes = ctx.analysis("shapes", graph)
            graph._onnxopt_owners = output_owners(graph)  # output tensors keep their identity within a round
            for node in list(graph.nodes):
                if not node.outputs or not node.inputs:
                    continue  # removed earlier in this round
                if node.op == "BatchNormalization" and self.options.batchnorm and _fold_bn(graph, node):
                    counts["batchnorm_folded"] += 1
                    step += 1
                elif node.op in ("Mul", "Add") and self.options.affine and _fold_affine(graph, node):
                    counts["affine_folded"] += 1
                    step += 1
                elif node.op in ("Mul", "Add") and self.options.affine and _merge_chain(graph, node):
                    counts["chains_merged"] += 1
                    step += 1
                elif node.op == "MatMul" and self.options.gemm and _matmul_add_to_gemm(graph, node, shapes):
                    counts["matmul_add_to_gemm"] += 1
                    step += 1
            if not step:
                break
            changed = True
            cleanup(graph)
            ctx.invalidate()
        graph._onnxopt_owners = None
        return PassResult(changed=changed, stats=counts)


def _sole_consumer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    """The only consumer of `t`, if it has exactly one and `t` is no output of the graph or a subgraph."""
    owners = getattr(graph, "_onnxopt_owners", None)
    if owners is None:
        owners = output_owners(graph)
    if len(t.outputs) != 1 or id(t) in owners:
        return None
    return t.outputs[0]


def _weighted_producer(graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
    """The Conv/ConvTranspose/Gemm producing `t` with constant weights, if `t` feeds only one node."""
    if not t.inputs or _sole_consumer(graph, t) is None:
        return None
    p = t.inputs[0]
    if p.op not in WEIGHTED or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
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


def _apply_affine(graph: gs.Graph, p: gs.Node, a: np.ndarray | None, c: np.ndarray | None) -> None:
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
    p.inputs[1] = new_constant(graph, unique_name(graph, f"{p.name or p.op}_W_fused"), new_w)
    bias = gs.Constant(unique_name(graph, f"{p.name or p.op}_B_fused"), new_b)
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


def _bypass(graph: gs.Graph, node: gs.Node, replacement: gs.Tensor) -> None:
    """Remove `node` (single output) and make its consumers read `replacement`."""
    out = node.outputs[0]
    prod = replacement.inputs[0] if replacement.inputs else None
    if prod is not None and len(replacement.outputs) == 1 and replacement.outputs[0] is node:
        detach(node)  # the fused op now produces the old output tensor itself: names stay
        k = next(i for i, t in enumerate(prod.outputs) if t is replacement)
        prod.outputs[k] = out
        return
    replace_all_uses(graph, out, replacement, getattr(graph, "_onnxopt_owners", None))
    detach(node)


def _split_shared_producer(graph: gs.Graph, bn: gs.Node) -> None:
    """If a weighted op feeds only BatchNorms (several), give `bn` its own copy of that op.

    Each BatchNorm then folds into its copy: k BNs + 1 op become k ops.
    """
    t = bn.inputs[0]
    if not t.inputs or len(t.outputs) < 2 or any(o is t for o in graph.outputs):
        return
    if not all(c.op == "BatchNormalization" for c in t.outputs):
        return
    p = t.inputs[0]
    if p.op not in WEIGHTED or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
        return
    out = gs.Variable(unique_name(graph, f"{t.name}_{bn.name}"), dtype=t.dtype, shape=t.shape)
    graph.nodes.append(gs.Node(p.op, name=unique_name(graph, f"{p.name}_{bn.name}"), attrs=dict(p.attrs),
                               domain=p.domain, inputs=list(p.inputs), outputs=[out]))
    bn.inputs[0] = out


def _fold_bn(graph: gs.Graph, bn: gs.Node) -> bool:
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return False
    _split_shared_producer(graph, bn)
    p = _weighted_producer(graph, bn.inputs[0])
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if p is None or any(v is None for v in params) or not _gemm_bias_ok(p):
        return False
    a, c = bn_affine(*params, float(bn.attrs.get("epsilon", 1e-5)))
    _apply_affine(graph, p, a, c)
    _bypass(graph, bn, p.outputs[0])
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
    if v.dtype.kind != "f":
        return None
    return x, v


def _fold_affine(graph: gs.Graph, node: gs.Node) -> bool:
    """Mul/Add by a per-channel constant after a weighted op or a BatchNormalization."""
    found = _const_operand(node)
    if found is None:
        return False
    x, v = found
    if not x.inputs or _sole_consumer(graph, x) is None:
        return False
    p = x.inputs[0]
    if p.op in WEIGHTED:
        if _weighted_producer(graph, x) is None or not _gemm_bias_ok(p):
            return False
        w = constant_value(p.inputs[1])
        channels, _, _ = _out_channels(p, w)
        rank = 2 if p.op == "Gemm" else w.ndim
        vec = per_channel(v, rank, 1, channels)
        if vec is None or (v.ndim > rank) or _broadcast_grows(v, rank):
            return False
        if node.op == "Mul":
            _apply_affine(graph, p, vec, None)
        else:
            _apply_affine(graph, p, None, vec)
        _bypass(graph, node, p.outputs[0])
        return True
    if p.op == "BatchNormalization" and len(p.outputs) == 1:
        params = [constant_value(t) for t in p.inputs[1:5]]
        if any(q is None for q in params):
            return False
        channels = params[0].shape[0]
        rank = _rank_hint(x, v)
        vec = per_channel(v, rank, 1, channels) if rank >= 2 else None
        if vec is None or _broadcast_grows(v, rank):
            return False
        scale, bias = params[0].astype(np.float64), params[1].astype(np.float64)
        if node.op == "Mul":
            scale, bias = scale * vec, bias * vec
        else:
            bias = bias + vec
        dt = params[0].dtype
        p.inputs[1] = gs.Constant(unique_name(graph, f"{p.name or 'bn'}_scale_fused"), scale.astype(dt))
        p.inputs[2] = gs.Constant(unique_name(graph, f"{p.name or 'bn'}_bias_fused"), bias.astype(dt))
        _bypass(graph, node, p.outputs[0])
        return True
    return False


def _rank_hint(x: gs.Tensor, v: np.ndarray) -> int:
    """Rank of the BN output: from the tensor's shape if known, else 4 (NCHW)."""
    if x.shape is not None:
        return len(x.shape)
    return max(4, v.ndim)


def _broadcast_grows(v: np.ndarray, rank: int) -> bool:
    """True if adding `v` would raise the output's rank (then the op is not shape-preserving)."""
    return v.ndim > rank


def _merge_chain(graph: gs.Graph, node: gs.Node) -> bool:
    """Mul(Mul(x, a), b) -> Mul(x, a*b) and Add(Add(x, a), b) -> Add(x, a+b) for constants."""
    found = _const_operand(node)
    if found is None:
        return False
    x, v2 = found
    if not x.inputs or x.inputs[0].op != node.op or _sole_consumer(graph, x) is None:
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
    node.inputs[1] = new_constant(graph, unique_name(graph, f"{node.name or node.op}_merged"), merged.astype(dtype))
    detach(inner)
    return True


def _matmul_add_to_gemm(graph: gs.Graph, mm: gs.Node, shapes: dict) -> bool:
    """MatMul(x [M, K], W [K, N]) followed by Add(bias [N] or [1, N]) becomes one Gemm."""
    w_shape = constant_shape(mm.inputs[1])
    info = shapes.get(mm.inputs[0].name)
    if w_shape is None or len(w_shape) != 2 or info is None or info.shape is None or len(info.shape) != 2:
        return False
    add = _sole_consumer(graph, mm.outputs[0])
    if add is None or add.op != "Add":
        return False
    found = _const_operand(add)
    if found is None or found[0] is not mm.outputs[0]:
        return False
    bias = found[1]
    n = w_shape[1]
    if not (bias.shape in ((n,), (1, n)) or bias.size == 1):
        return False
    bias_vec = np.broadcast_to(bias.reshape(-1), (n,)).astype(bias.dtype)
    x, w_t, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
    c = gs.Constant(unique_name(graph, f"{add.name or 'bias'}_C"), bias_vec)
    for n in (add, mm):
        detach(n)
    graph.nodes.append(gs.Node("Gemm", name=unique_name(graph, f"{mm.name or 'MatMul'}_gemm"),
                               inputs=[x, w_t, c], outputs=[out]))
    return True
