"""What ONNX ops are, in one table that every pass and the statistics read.

For each op onnxopt rewrites or counts: which input is its weight (and bias), the
layout of that weight and the axis that holds its output channels, how many
multiply-accumulates it costs, and which passes may touch it (quantize, prune,
lowrank, fuse). A pass asks here instead of keeping its own list, so a new op or
a corrected fact changes every pass at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx

#: A tensor shape as shape inference knows it: sizes, symbolic names, None for unknown.
Shape = tuple[int | str | None, ...]


def known_size(dims) -> int | None:
    """Product of known dims; None if any is symbolic, unknown or negative (-1: a dynamic axis some
    exporters write as a value)."""
    out = 1
    for d in dims:
        if not isinstance(d, int) or d < 0:
            return None
        out *= d
    return out


def _mul(*factors: int | None) -> int | None:
    out = 1
    for f in factors:
        if f is None:
            return None
        out *= f
    return out


def _conv(x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto) -> int | None:
    """Each output value sums over one filter: |y| * |w| / C_out."""
    return None if w is None or y is None else _mul(known_size(y), known_size(w[1:]))


def _conv_transpose(x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto) -> int | None:
    """Each input value is spread over one filter: |x| * |w| / C_in."""
    return None if x is None or w is None else _mul(known_size(x), known_size(w[1:]))


def _matmul(x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto) -> int | None:
    """|y| * K, K the last axis of the first operand (or the first, for Gemm/QGemm with transA)."""
    if x is None or y is None or not x:
        return None
    trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
    k = x[0] if trans_a else x[-1]
    return _mul(known_size(y), k if isinstance(k, int) else None)


def recurrent_macs(
    x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto, r: Shape | None = None
) -> int | None:
    """LSTM/GRU/RNN (and DynamicQuantizeLSTM, whose weights are transposed): every step of every batch row
    multiplies the input by W and the hidden state by R, so |W| + |R| per step, times sequence x batch
    (the first two axes of X in either layout)."""
    if x is None or w is None or r is None or len(x) < 2:
        return None
    pw, pr = known_size(w), known_size(r)
    return _mul(known_size(x[:2]), None if pw is None or pr is None else pw + pr)


def _attention(x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto) -> int | None:
    """com.microsoft Attention: the packed QKV projection, B * S * |w|, plus Q @ K^T and probabilities
    @ V, B * S * S * (Hqk + Hv): the MatMuls it replaces, counted as `_matmul` counts them."""
    if x is None or w is None or len(x) != 3 or len(w) != 2 or getattr(node, "domain", "") != "com.microsoft":
        return None
    sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
    if sizes and len(sizes) == 3:
        qk_v: int | None = sizes[0] + sizes[2]
    else:
        qk_v = 2 * w[1] // 3 if isinstance(w[1], int) else None
    seq, weights = x[1], known_size(w)
    if qk_v is None or weights is None or not isinstance(seq, int):
        return None
    return _mul(known_size(x[:2]), weights + seq * qk_v)


def _matmul_nbits(x: Shape | None, w: Shape | None, y: Shape | None, node: onnx.NodeProto) -> int | None:
    """com.microsoft MatMulNBits: its weight is packed in blocks, so K and N come from its attributes:
    rows of x times K * N."""
    attrs = {a.name: a.i for a in node.attribute}
    if x is None or "K" not in attrs or "N" not in attrs:
        return None
    return _mul(known_size(x[:-1]), attrs["K"] * attrs["N"])


#: What each op costs: op type -> (formula(x, w, y, node), input index of the data, of the weight).
#: Integer and quantized forms share the formula of the float op they compute.
MAC_FORMULAS: dict[str, tuple[Callable[..., int | None], int, int]] = {
    "Conv": (_conv, 0, 1),
    "ConvInteger": (_conv, 0, 1),
    "QLinearConv": (_conv, 0, 3),
    "ConvTranspose": (_conv_transpose, 0, 1),
    "Gemm": (_matmul, 0, 1),
    "QGemm": (_matmul, 0, 3),
    "MatMul": (_matmul, 0, 1),
    "MatMulInteger": (_matmul, 0, 1),
    "QLinearMatMul": (_matmul, 0, 3),
    "MatMulIntegerToFloat": (_matmul, 0, 1),
    "DynamicQuantizeMatMul": (_matmul, 0, 1),
    "LSTM": (recurrent_macs, 0, 1),
    "GRU": (recurrent_macs, 0, 1),
    "RNN": (recurrent_macs, 0, 1),
    "DynamicQuantizeLSTM": (recurrent_macs, 0, 1),
    "Attention": (_attention, 0, 1),
    "QAttention": (_attention, 0, 1),
    "MatMulNBits": (_matmul_nbits, 0, 1),
}


@dataclass(frozen=True)
class OpFacts:
    """Facts about one op type.

    `weight_input`/`bias_input`: input indices of the weight and bias a pass may rewrite
    (None: the op has none). `layout`: how the weight is laid out, naming the output
    channel (O) and reduced (I) axes: "OI..." (Conv), "IO..." (ConvTranspose, grouped),
    "IO" (MatMul, Gemm), "OI" (Gemm with transB=1).
    """

    weight_input: int | None = None
    bias_input: int | None = None
    layout: str = ""
    #: QDQ around it becomes an integer kernel in onnxruntime (the quantize pass's layers).
    quantizable: bool = False
    #: Its output channels can be removed by slicing its weight (the prune pass's producers).
    prunable: bool = False
    #: Its weight is a matrix product that can be split in two thinner ones (lowrank).
    factorizable: bool = False
    #: A per-channel scale and shift after it fold into its weight and bias (fuse).
    fusable: bool = False
    #: Only moves or selects values: the output keeps the input's quantization scale.
    pass_through: bool = False
    #: Recurrent weight inputs (W, R), which onnxruntime's CPU EP runs float: int8 storage only.
    recurrent_weights: tuple[int, ...] = ()
    #: Already computes on integers (what onnxruntime's quantizers write).
    integer: bool = False
    #: A constant input that can only be stored int8 (no int8 kernel computes with it from QDQ on
    #: the CPU EP): (input index, axis of its rows or output channels, scaled per row/block).
    stored_weight: tuple[int, int] | None = None
    #: Its inputs and outputs stay float unless measured safe: normalization, softmax and GELU
    #: outputs carry outliers that one activation scale rounds away (transformer encoders).
    keep_float_io: bool = False
    #: The com.microsoft op that computes it in int8 from an input quantized per run
    #: (DynamicQuantizeLinear) and its int8 weight (per output column), its other inputs unchanged.
    dynamic_int8_op: str | None = None


OPS: dict[str, OpFacts] = {
    "Conv": OpFacts(
        weight_input=1, bias_input=2, layout="OI...", quantizable=True, prunable=True, factorizable=True, fusable=True
    ),
    "ConvTranspose": OpFacts(
        weight_input=1, bias_input=2, layout="IO...", quantizable=True, prunable=True, fusable=True
    ),
    "Gemm": OpFacts(
        weight_input=1, bias_input=2, layout="IO", quantizable=True, prunable=True, factorizable=True, fusable=True
    ),
    "MatMul": OpFacts(weight_input=1, layout="IO", quantizable=True, prunable=True, factorizable=True),
    **{
        op: OpFacts(pass_through=True)
        for op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity")
    },
    **{op: OpFacts(weight_input=1, recurrent_weights=(1, 2)) for op in ("LSTM", "GRU", "RNN")},
    # a lookup table (word embeddings): int8 rows, scaled per block of each row
    "Gather": OpFacts(stored_weight=(0, 0)),
    # com.microsoft Attention: its [hidden, 3 x hidden] QKV weight
    "Attention": OpFacts(stored_weight=(1, 1), layout="IO", dynamic_int8_op="QAttention"),
    **{
        op: OpFacts(keep_float_io=True)
        for op in (
            "LayerNormalization",
            "SkipLayerNormalization",
            "Softmax",
            "Gelu",
            "BiasGelu",
            "FastGelu",
            "Erf",
        )
    },
    **{
        op: OpFacts(integer=True)
        for op in (
            "MatMulInteger",
            "ConvInteger",
            "DynamicQuantizeLSTM",
            "QLinearConv",
            "QLinearMatMul",
            "QGemm",
            "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul",
            "QAttention",
            "QLinearConvTranspose",
        )
    },
}

#: Weights of fewer values stay float rather than int8-stored (two extra nodes cost more than the
#: bytes saved); a Cast or DequantizeLinear of an (u)int8 constant at least this large to float is
#: such storage, which constant folding must not undo.
INT8_STORAGE_MIN_ELEMENTS = 1024

#: The first default-domain opset version that has a standard op the fuse pass writes; a model of an
#: older opset keeps the decomposed form (onnx.checker rejects the op there).
SINCE_OPSET: dict[str, int] = {"LayerNormalization": 17, "Gelu": 20}

#: onnxruntime's contrib-operator domain (Gelu, BiasGelu, FastGelu, SkipLayerNormalization, ...), and
#: the pipeline targets whose runtime runs it (its CPU and CUDA execution providers; not OpenVINO).
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_TARGETS = ("cpu", "cuda")


def facts(op_type: str) -> OpFacts:
    """The facts of `op_type` (an empty `OpFacts` for an op the table does not list)."""
    return OPS.get(op_type, _NONE)


_NONE = OpFacts()


def ops_where(flag: str) -> tuple[str, ...]:
    """The op types whose fact `flag` (e.g. "quantizable") is true, in table order."""
    return tuple(op for op, f in OPS.items() if getattr(f, flag))


def node_attrs(node: Any) -> Mapping[str, Any]:
    """The attributes of a graphsurgeon node or a NodeProto, as {name: value}."""
    if isinstance(node, onnx.NodeProto):
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return node.attrs


def op_type(node: Any) -> str:
    """The op type of a graphsurgeon node or a NodeProto."""
    return node.op_type if isinstance(node, onnx.NodeProto) else node.op


def out_channel_axis(node: Any) -> int:
    """The axis of a weighted node's weight that indexes its output channels: Conv 0,
    ConvTranspose 1 (per group), MatMul 1, Gemm 1 (0 with transB=1)."""
    op = op_type(node)
    if op == "Gemm":
        return 0 if int(node_attrs(node).get("transB", 0)) else 1
    layout = facts(op).layout
    if not layout:
        raise ValueError(f"{op} has no weight with output channels")
    return layout.index("O")


def reduced_axes(node: Any, ndim: int) -> tuple[int, ...]:
    """The axes of a weighted node's weight that it sums over for one output value."""
    axis = out_channel_axis(node)
    if op_type(node) in ("Conv", "ConvTranspose"):
        return tuple(a for a in range(ndim) if a != axis)
    return (1 - axis,)
