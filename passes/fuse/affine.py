"""Per-channel affine ops folded into the op before them: BatchNormalization and Mul/Add by a
per-channel constant into the weight and bias of a Conv/ConvTranspose/Gemm (the op table's fusable
ops), Mul/Add into a BatchNormalization's scale and bias. Numbers: `onnxopt.kernels.fusion`."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value, is_constant, new_constant, unique_name
from onnxopt.ir.graph_state import pinned_output_owners
from onnxopt.ir.ops import facts, ops_where, out_channel_axis
from onnxopt.kernels.fusion import affine_bias, bn_affine, per_channel, scale_output_channels
from onnxopt.passes.fuse.scope import Scope, bypass, const_operand, sole_consumer

#: Ops a per-channel scale and shift fold into (Conv, ConvTranspose, Gemm), from the op table.
FUSABLE = ops_where("fusable")


def _weighted_producer(sc: Scope, t: gs.Tensor) -> gs.Node | None:
    """The Conv/ConvTranspose/Gemm of this graph producing `t` with constant weights, if `t` feeds only one node."""
    if not t.inputs or sole_consumer(sc, t) is None:
        return None
    p = t.inputs[0]
    if not sc.owns(p) or p.op not in FUSABLE or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
        return None
    if len(p.inputs) > 2 and p.inputs[2].name and not is_constant(p.inputs[2]):
        return None
    if p.op == "Gemm" and p.attrs.get("transA", 0) not in (0, 1):
        return None
    return p


def _out_channels(p: gs.Node, w: np.ndarray) -> tuple[int, int, int]:
    """(output channel count, weight axis of output channels, groups) of a weighted op.

    The axis is the op table's; a weight laid out "IO..." (ConvTranspose) holds the output
    channels of one group on it, so the count is that axis times `group`."""
    axis = out_channel_axis(p)
    groups = int(p.attrs.get("group", 1)) if facts(p.op).layout == "IO..." else 1
    return w.shape[axis] * groups, axis, groups


def _apply_affine(sc: Scope, p: gs.Node, a: np.ndarray | None, c: np.ndarray | None) -> None:
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


def _split_shared_producer(sc: Scope, bn: gs.Node) -> None:
    """If a weighted op feeds only BatchNorms (several) of its own graph, give `bn` its own copy of that op.

    Each BatchNorm then folds into its copy: k BNs + 1 op become k ops.
    """
    t = bn.inputs[0]
    if not t.inputs or len(t.outputs) < 2 or id(t) in (pinned_output_owners(sc.root) or {}):
        return
    if not all(c.op == "BatchNormalization" and sc.owns(c) for c in t.outputs):
        return
    p = t.inputs[0]
    if not sc.owns(p) or p.op not in FUSABLE or len(p.outputs) != 1 or not is_constant(p.inputs[1]):
        return
    if any(o is t for o in sc.graph.outputs):
        return
    out = gs.Variable(unique_name(sc.root, f"{t.name}_{bn.name}"), dtype=t.dtype, shape=t.shape)
    sc.add(
        gs.Node(
            p.op,
            name=unique_name(sc.root, f"{p.name}_{bn.name}"),
            attrs=dict(p.attrs),
            domain=p.domain,
            inputs=list(p.inputs),
            outputs=[out],
        )
    )
    bn.inputs[0] = out


def _bn_params(sc: Scope, bn: gs.Node) -> list[np.ndarray] | None:
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


def fold_bn(sc: Scope, bn: gs.Node) -> bool:
    """Inference BatchNormalization after a weighted op of this graph: into its weight and bias."""
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
    scale, bias, mean, var = params
    a, c = bn_affine(scale, bias, mean, var, float(bn.attrs.get("epsilon", 1e-5)))
    _apply_affine(sc, p, a, c)
    bypass(sc, bn, p.outputs[0])
    return True


def fold_affine(sc: Scope, node: gs.Node) -> bool:
    """Mul/Add by a per-channel constant after a weighted op or a BatchNormalization."""
    found = const_operand(node)
    if found is None:
        return False
    x, v = found
    if not x.inputs or sole_consumer(sc, x) is None or not sc.owns(x.inputs[0]):
        return False
    p = x.inputs[0]
    if p.op in FUSABLE:
        return _affine_into_weighted(sc, node, x, v, p)
    if p.op == "BatchNormalization" and len(p.outputs) == 1:
        return _affine_into_bn(sc, node, x, v, p)
    return False


def _affine_into_weighted(sc: Scope, node: gs.Node, x: gs.Tensor, v: np.ndarray, p: gs.Node) -> bool:
    """Mul/Add `node` by `v` on `x`, the output of weighted op `p`, goes into `p`'s weight and bias."""
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
    bypass(sc, node, p.outputs[0])
    return True


def _bn_channel_vector(sc: Scope, x: gs.Tensor, v: np.ndarray, channels: int) -> np.ndarray | None:
    """`v` as one value per channel of the BatchNormalization output `x`, if it acts per channel and keeps
    the shape of `x`."""
    rank = sc.rank(x)
    if rank is None:  # rank unknown: only a single value is sure to act per channel and keep the shape
        return np.full(channels, float(v.reshape(-1)[0])) if v.size == 1 and v.ndim <= 1 else None
    return per_channel(v, rank, 1, channels) if rank >= 2 and not _broadcast_grows(v, rank) else None


def _affine_into_bn(sc: Scope, node: gs.Node, x: gs.Tensor, v: np.ndarray, p: gs.Node) -> bool:
    """Mul/Add `node` by `v` on `x`, the output of BatchNormalization `p`, goes into its scale and bias."""
    params = _bn_params(sc, p)
    if params is None:
        return False
    vec = _bn_channel_vector(sc, x, v, params[0].shape[0])
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
    bypass(sc, node, p.outputs[0])
    return True


def _broadcast_grows(v: np.ndarray, rank: int) -> bool:
    """True if adding `v` would raise the output's rank (then the op is not shape-preserving)."""
    return v.ndim > rank
