"""Multi-head self-attention fused into one com.microsoft Attention (targets cpu and cuda).

The decomposed form of BERT-style exports (matched in `attention_match`) becomes

    Attention(X, [Wq | Wk | Wv], [bq | bk | bv], mask_index = Cast(raw mask, int32))
        num_heads = N, scale (only when not 1 / sqrt(D)), mask_filter_value = the model's padded value,
        qkv_hidden_sizes (only when V's width differs)

which onnxruntime runs as one kernel (packed QKV projection, fused softmax) on its CPU and CUDA
execution providers. Standard ONNX has no attention operator below opset 23, so for the openvino
target the pattern stays decomposed and the stats and skipped list say so. The output projection
after the merged heads is left as it is (Attention does not include it).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.ir.graph import cleanup, detach, iter_graphs, new_constant, output_owners, unique_name
from onnxopt.ir.graph_state import pin_output_owners
from onnxopt.ir.ops import CONTRIB_DOMAIN, CONTRIB_TARGETS
from onnxopt.passes.fuse.attention_match import AttentionMatch, match_attention
from onnxopt.passes.fuse.scope import Scope

log = logging.getLogger(__name__)

#: The weight types com.microsoft Attention takes on each target whose runtime runs contrib ops.
ATTENTION_DTYPES: dict[str, tuple[type, ...]] = {"cpu": (np.float32,), "cuda": (np.float32, np.float16)}


def fuse_attention(graph: gs.Graph, ctx: PassContext, skipped: dict[str, dict[str, str]]) -> dict[str, int]:
    """Fuse every self-attention of `graph` and its bodies for `ctx.target`; cleans up after itself.

    Returns {"attention_fused": n, "attention_left_decomposed": m}: m counts the matches kept
    decomposed because the target has no attention operator or not for their type.
    """
    counts = {"attention_fused": 0, "attention_left_decomposed": 0}
    shapes = ctx.analysis("shapes", graph)
    dtypes = ATTENTION_DTYPES.get(ctx.target, ()) if ctx.target in CONTRIB_TARGETS else None
    pin_output_owners(graph, output_owners(graph))
    try:
        for g in list(iter_graphs(graph)):
            sc = Scope(graph, g, {id(n) for n in g.nodes}, shapes, skipped)
            for node in list(g.nodes):
                kind = _fuse_one(sc, node, ctx.target, dtypes) if node.op == "Softmax" and node.inputs else ""
                if kind:
                    counts[kind] += 1
    finally:
        pin_output_owners(graph, None)
    if counts["attention_fused"]:
        cleanup(graph)
        ctx.invalidate()
    return counts


def _fuse_one(sc: Scope, softmax: gs.Node, target: str, dtypes: tuple[type, ...] | None) -> str:
    """Fuse the attention around `softmax` if it matches; the name of the counter to raise ("" none)."""
    m = match_attention(sc, softmax)
    if m is None:
        return ""
    if isinstance(m, str):
        sc.skip(softmax, f"attention not fused: {m}")
        return ""
    if dtypes is None:
        sc.skip(
            softmax,
            f"attention left decomposed: target {target} takes standard ONNX ops, no attention op below opset 23",
        )
        return "attention_left_decomposed"
    if m.q.weight.dtype.type not in dtypes:
        sc.skip(softmax, f"attention left decomposed: {m.q.weight.dtype} Attention does not run on {target}")
        return "attention_left_decomposed"
    _rewrite(sc, m, softmax.name)
    return "attention_fused"


def _rewrite(sc: Scope, m: AttentionMatch, name: str) -> None:
    """Replace the matched nodes by one Attention producing the merged-heads tensor."""
    base = name.rsplit("/", 1)[0] if "/" in name else name
    weight = np.concatenate([m.q.weight, m.k.weight, m.v.weight], axis=1)
    bias = np.concatenate([m.q.bias, m.k.bias, m.v.bias])
    w = new_constant(sc.root, unique_name(sc.root, f"{base}/Attention_qkv_weight"), weight)
    b = new_constant(sc.root, unique_name(sc.root, f"{base}/Attention_qkv_bias"), bias)
    attrs: dict[str, object] = {"num_heads": m.q.heads}
    hidden = m.q.heads * m.q.head_size
    v_hidden = m.v.heads * m.v.head_size
    if v_hidden != hidden:
        attrs["qkv_hidden_sizes"] = [hidden, hidden, v_hidden]
    if not m.default_scale:
        attrs["scale"] = float(m.scale)
    inputs: list[gs.Tensor] = [m.x, w, b]
    if m.mask is not None:
        inputs.append(_mask_index(sc, m.mask))
        attrs["mask_filter_value"] = float(m.mask_filter)
    for node in m.nodes:
        detach(node)
    _keep_type(sc, m.output, m.q.weight.dtype)
    fused = gs.Node(
        "Attention",
        name=unique_name(sc.root, f"{base}/Attention"),
        domain=CONTRIB_DOMAIN,
        attrs=attrs,
        inputs=inputs,
        outputs=[m.output],
    )
    sc.add(fused)
    log.debug("fused attention %s: %d heads of %d", fused.name, m.q.heads, m.q.head_size)


def _keep_type(sc: Scope, out: gs.Tensor, dtype: object) -> None:
    """Give the fused output the type and shape inferred for it before: shape inference does not know
    contrib ops, so without them everything after the fused op would lose its shape. Dimensions
    inference named itself (unk__*) are left unnamed."""
    info = sc.shapes.get(out.name)
    if out.dtype is None:
        out.dtype = dtype
    if out.shape is None and info is not None and info.shape is not None:
        out.shape = [None if isinstance(d, str) and d.startswith("unk__") else d for d in info.shape]


def _mask_index(sc: Scope, raw: gs.Tensor) -> gs.Tensor:
    """`raw` as int32 (Attention's mask_index type): itself, or a Cast of it shared by every layer."""
    if raw.dtype == np.int32:
        return raw
    for c in raw.outputs:
        if c.op == "Cast" and int(c.attrs.get("to", 0)) == onnx.TensorProto.INT32 and sc.owns(c):
            return c.outputs[0]
    out = gs.Variable(unique_name(sc.root, f"{raw.name}_int32"), dtype=np.int32, shape=raw.shape)
    sc.add(
        gs.Node(
            "Cast",
            name=unique_name(sc.root, f"{raw.name}_Cast_int32"),
            attrs={"to": onnx.TensorProto.INT32},
            inputs=[raw],
            outputs=[out],
        )
    )
    return out
