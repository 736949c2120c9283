"""Which layers the quantize pass works on, and why the others are left alone.

Three kinds: the candidates (quantizable layers of the main graph with constant
float weights: calibrated int8 compute or int8 weight storage), the layers
outside the calibrated path (recurrent layers anywhere, quantizable layers
inside If/Loop/Scan bodies: int8 weight storage only), and the layers that
already compute in integers (reported, left as they are).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxopt.ir.ops import facts, node_attrs, ops_where, out_channel_axis
from onnxopt.kernels.quant import all_finite
from onnxopt.passes.quantize.proto_graphs import walk_graphs
from onnxopt.passes.quantize.state import Outside, Work, name_matches


def integer_layers(model: onnx.ModelProto) -> list[dict[str, str]]:
    """The layers of `model` (subgraphs included) that already compute in integers: integer ops, and
    quantizable layers whose weight comes from a DequantizeLinear of an integer tensor (QDQ form), as
    report rows {node, op, where}."""
    integer_ops, quantizable = ops_where("integer"), ops_where("quantizable")
    rows = []
    for g, where, _ in walk_graphs(model.graph):
        dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
        for n in g.node:
            if n.op_type in integer_ops:
                rows.append({"node": n.name, "op": n.op_type, "where": where})
            elif n.op_type in quantizable and len(n.input) > 1 and n.input[1] in dq_out:
                rows.append({"node": n.name, "op": f"{n.op_type} (QDQ)", "where": where})
    return rows


def report_already(work: Work) -> None:
    """A report row for each layer that already computes in integers, saying it is left as it is."""
    for r in work.already:
        redo = (
            " (requantize=true redoes it with calibration)"
            if r["op"] == "MatMulInteger" and not work.opts.requantize
            else ""
        )
        work.rows[r["node"]] = {
            **r,
            "int8": True,
            "already_int8": True,
            "why": f"already int8 ({r['op']}): left as it is{redo}",
        }


def candidates(work: Work) -> list[onnx.NodeProto]:
    """Quantizable nodes with constant float weights that pass the include/exclude filters (unnamed
    nodes get a name here)."""
    opts, quantizable, already = work.opts, ops_where("quantizable"), work.already_main
    found = []
    for i, n in enumerate(work.model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        if not _selected_op(work, n, quantizable) or n.name in already:
            continue
        if opts.include and not name_matches(n.name, opts.include):
            continue
        if name_matches(n.name, opts.exclude):
            work.rows[n.name] = {"node": n.name, "op": n.op_type, "int8": False, "why": "excluded"}
            continue
        reason = unsupported(work, n)
        if reason:
            work.skipped.append({"node": n.name, "op": n.op_type, "reason": reason})
            continue
        found.append(n)
    work.nodes = {n.name: n for n in work.model.graph.node}
    return found


def _selected_op(work: Work, n: onnx.NodeProto, quantizable: tuple[str, ...]) -> bool:
    """Whether the op of `n` is one the pass quantizes: a quantizable op of `op_types`, or (option
    `int8_attention`) a com.microsoft op with an int8 form of its own (Attention -> QAttention)."""
    if n.op_type in quantizable:
        return n.op_type in work.opts.op_types
    return bool(work.opts.int8_attention and facts(n.op_type).dynamic_int8_op and n.domain == "com.microsoft")


def unsupported(work: Work, n: onnx.NodeProto) -> str | None:
    """Why candidate `n` cannot be quantized (None: it can)."""
    if facts(n.op_type).dynamic_int8_op:
        why = _int8_op_problem(n)
        if why:
            return why
    if len(n.input) < 2 or n.input[1] not in work.consts:
        producer = work.producer.get(n.input[1]) if len(n.input) >= 2 else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight already int8 (DequantizeLinear)"
        return "weight is not a constant"
    if n.input[0] in work.consts:
        return "input is a constant (fold it first)"
    return _weight_problem(work.consts[n.input[1]]) or _layout_problem(work, n)


def _int8_op_problem(n: onnx.NodeProto) -> str | None:
    """Why an Attention has no QAttention form: packed Q/K/V of different sizes, inputs beyond
    past (attention bias, past sequence length), or no bias (QAttention needs one)."""
    if "qkv_hidden_sizes" in node_attrs(n):
        return "Attention with qkv_hidden_sizes: QAttention needs equal Q, K and V sizes"
    if any(n.input[5:]):
        return "Attention inputs beyond past: QAttention has none"
    if len(n.input) < 3 or not n.input[2]:
        return "Attention without a bias: QAttention needs one"
    return None


def _weight_problem(w: np.ndarray) -> str | None:
    """Why a constant weight cannot be quantized: not float32, or not finite."""
    if w.dtype != np.float32:
        return f"weight dtype {w.dtype} is not float32"
    if not all_finite(w):
        return "weight holds inf/NaN: kept float"
    return None


def _layout_problem(work: Work, n: onnx.NodeProto) -> str | None:
    """Why the bias or the form of `n` (2-D MatMul weight, plain Gemm) rules it out."""
    has_bias = len(n.input) > 2 and bool(n.input[2])
    if has_bias and n.input[2] not in work.consts:
        return "bias is not a constant"
    if n.op_type == "MatMul" and work.consts[n.input[1]].ndim != 2:
        return "MatMul weight is not 2-D"
    if n.op_type == "Gemm":
        attrs = node_attrs(n)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA or alpha/beta != 1"
        if has_bias and work.consts[n.input[2]].ndim != 1:
            return "Gemm bias is not 1-D"
    return None


def outside_layers(work: Work) -> list[Outside]:
    """Layers that can only get int8 weight storage, with their (weight tensor, output-channel axis)
    pairs: recurrent layers (LSTM/GRU/RNN: no int8 kernel fuses from QDQ on the CPU EP) anywhere,
    and quantizable layers inside If/Loop/Scan bodies, whose activations cannot be calibrated by
    adding graph outputs. A weight defined in an outer graph is found through the scopes (outer-scope
    reference). Layers whose weights are not constants go to the skipped list, with why."""
    found = []
    for g, where, scopes in walk_graphs(work.model.graph):
        body = where != "main graph"
        for n in _storage_only_nodes(work, g, body, scopes):
            row = {"node": n.name, "op": n.op_type, "where": where, "int8": False}
            if name_matches(n.name, work.opts.exclude):
                work.rows[n.name] = {**row, "why": "excluded"}
                continue
            f = facts(n.op_type)
            idx = f.recurrent_weights or ((f.stored_weight[0],) if f.stored_weight else (1,))
            axis = 1 if f.recurrent_weights else f.stored_weight[1] if f.stored_weight else out_channel_axis(n)
            weights = _constant_weights(n, idx, axis, scopes)
            if isinstance(weights, str):
                work.skipped.append({"node": n.name, "op": n.op_type, "reason": f"{where}: {weights}"})
                continue
            row["why"] = (
                f"inside {where}: its activations cannot be calibrated, int8 compute not tried"
                if body
                else f"no int8 {n.op_type} kernel from QDQ on the CPU EP"
            )
            found.append((row, weights))
    return found


def _storage_only_nodes(
    work: Work, g: onnx.GraphProto, body: bool, scopes: list[dict[str, onnx.TensorProto]]
) -> Iterator[onnx.NodeProto]:
    """The nodes of `g` outside the calibrated path (recurrent anywhere; anywhere, ops whose
    `stored_weight` input is a constant: a Gather's lookup table, com.microsoft Attention's QKV
    weight; in a body, quantizable ops of `op_types`) that pass `include`."""
    quantizable = ops_where("quantizable")
    computing = {c.name for c in work.cands} if not body else set()
    for n in g.node:
        if n.name in computing:  # a candidate (Attention with a QAttention form) stores its weight as one
            continue
        f = facts(n.op_type)
        table = f.stored_weight is not None and _is_table_input(n, f.stored_weight[0], scopes)
        if not (f.recurrent_weights or table) and not (
            body and n.op_type in quantizable and n.op_type in work.opts.op_types
        ):
            continue
        if work.opts.include and not name_matches(n.name, work.opts.include):
            continue
        yield n


def _is_table_input(n: onnx.NodeProto, i: int, scopes: list[dict[str, onnx.TensorProto]]) -> bool:
    """Whether input `i` of `n` is a float constant of at least two axes visible in its graph (a
    Gather of a computed shape, or of a constant shape vector, is no lookup table)."""
    t = n.input[i] if i < len(n.input) else ""
    value = next((sc[t] for sc in scopes if t in sc), None)
    return value is not None and value.data_type == onnx.TensorProto.FLOAT and len(value.dims) >= 2


def _constant_weights(
    n: onnx.NodeProto, idx: tuple[int, ...], axis: int, scopes: list[dict[str, onnx.TensorProto]]
) -> list[tuple[str, int]] | str:
    """(tensor, axis) of the weights at inputs `idx` of `n`, or why one is not a finite float constant."""
    weights, why = [], None
    for i in idx:
        t = n.input[i] if i < len(n.input) else ""
        value = next((sc[t] for sc in scopes if t in sc), None)
        if value is None:
            why = f"weight '{t}' is computed, not a constant"
        elif value.data_type != onnx.TensorProto.FLOAT:
            why = f"weight '{t}' is {onnx.helper.tensor_dtype_to_np_dtype(value.data_type)}, not float32"
        elif value.data_location != onnx.TensorProto.EXTERNAL and not all_finite(onnx.numpy_helper.to_array(value)):
            why = f"weight '{t}' holds inf/NaN: kept float"
        else:
            weights.append((t, axis))
    return why if why else weights
