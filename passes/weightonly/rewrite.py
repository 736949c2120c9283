"""Writing a quantized weight into the graph: com.microsoft MatMulNBits (and GatherBlockQuantized)
where the target's runtime has them (onnxruntime CPU/CUDA), else the standard blocked
DequantizeLinear (opset 21, uint4/uint8 codes) feeding the original MatMul / Gather.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.onnx_cpp2py_export.version_converter import ConvertError

from onnxopt.ir.graph import detach, export_model, import_model, unique_name
from onnxopt.ir.gs_compat import LazyValues
from onnxopt.ir.ops import CONTRIB_DOMAIN
from onnxopt.kernels.blockquant import BlockQuant, pack_matmul_nbits
from onnxopt.passes.weightonly.layers import Layer, Table

#: The default-domain opset whose DequantizeLinear takes `block_size` and 4-bit codes.
BLOCKED_DQ_OPSET = 21


def _const(graph: gs.Graph, base: str, values: np.ndarray) -> gs.Constant:
    """A new constant named after `base`; 4-bit codes are kept as their TensorProto (gs cannot export
    a uint4 numpy array), so nothing must load them into numpy before export."""
    name = unique_name(graph, base)
    if values.dtype == ml_dtypes.uint4:
        return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


def _codes(graph: gs.Graph, base: str, codes: np.ndarray, bits: int) -> gs.Constant:
    return _const(graph, base, codes.astype(ml_dtypes.uint4 if bits == 4 else np.uint8))


def _input(graph: gs.Graph, L: Layer, scale: np.ndarray | None) -> gs.Tensor:
    """The layer's input, divided by its AWQ channel scales when it has them (one Mul)."""
    if scale is None:
        return L.x
    base = L.node.name or "weightonly"
    inv = _const(graph, f"{base}_awq_inv_scale", (1.0 / scale).astype(np.float32))
    out = gs.Variable(unique_name(graph, f"{base}_awq_x"), np.float32)
    graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{base}_awq"), inputs=[L.x, inv], outputs=[out]))
    return out


def _with_bias(graph: gs.Graph, L: Layer, out: gs.Tensor) -> list[gs.Tensor]:
    """Outputs for the product: `out` itself, or a new tensor then Add(bias) -> `out` for a Gemm with C."""
    if L.bias is None:
        return [out]
    tmp = gs.Variable(unique_name(graph, f"{L.node.name}_nobias"), np.float32)
    b = _const(graph, f"{L.node.name}_bias", L.bias.astype(np.float32))
    graph.nodes.append(gs.Node("Add", unique_name(graph, f"{L.node.name}_bias_add"), inputs=[tmp, b], outputs=[out]))
    return [tmp]


def write_nbits(graph: gs.Graph, L: Layer, bq: BlockQuant, level: int) -> None:
    """Replace L by MatMulNBits(x, B, scales, zero_points) (+ Add bias)."""
    B, S, Z = pack_matmul_nbits(bq)
    base = L.node.name or "weightonly"
    out = L.node.outputs[0]
    x = _input(graph, L, L.awq_scale.get(L.form))
    ins = [x, _const(graph, f"{base}_B{bq.bits}", B), _const(graph, f"{base}_scales", S)]
    ins.append(_const(graph, f"{base}_zero_points", Z))
    attrs = {"K": L.k, "N": L.n, "bits": bq.bits, "block_size": bq.block}
    if level:
        attrs["accuracy_level"] = level
    outs = _with_bias(graph, L, out)
    detach(L.node)
    graph.nodes.append(
        gs.Node("MatMulNBits", unique_name(graph, f"{base}_Q{bq.bits}"), attrs, ins, outs, CONTRIB_DOMAIN)
    )


def write_dq(graph: gs.Graph, L: Layer, bq: BlockQuant) -> None:
    """Replace L's weight by DequantizeLinear(codes K x N, scales, zero points; axis 0, block_size)
    feeding a MatMul (+ Add bias), all standard operators."""
    base = L.node.name or "weightonly"
    w = gs.Variable(unique_name(graph, f"{base}_W_dq"), np.float32, [L.k, L.n])
    dq_ins = [
        _codes(graph, f"{base}_W_q{bq.bits}", bq.q, bq.bits),
        _const(graph, f"{base}_W_scales", bq.scales),
        _codes(graph, f"{base}_W_zero_points", bq.zero_points, bq.bits),
    ]
    attrs = {"axis": 0, "block_size": bq.block}
    graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{base}_W_dq"), attrs, dq_ins, [w]))
    x = _input(graph, L, L.awq_scale.get(L.form))
    out = L.node.outputs[0]
    outs = _with_bias(graph, L, out)
    detach(L.node)
    graph.nodes.append(gs.Node("MatMul", unique_name(graph, f"{base}_Q{bq.bits}"), inputs=[x, w], outputs=outs))


def write_table(graph: gs.Graph, T: Table, bq: BlockQuant, contrib: bool) -> None:
    """Replace a Gather of a constant table by GatherBlockQuantized (contrib) or by a Gather of
    DequantizeLinear(codes rows x D, axis 1, block_size) of the table."""
    node = T.node
    base = node.name or "weightonly_gather"
    codes = _codes(graph, f"{base}_table_q{bq.bits}", np.ascontiguousarray(bq.q.T), bq.bits)
    scales = _const(graph, f"{base}_table_scales", np.ascontiguousarray(bq.scales.T))
    zps = _codes(graph, f"{base}_table_zero_points", np.ascontiguousarray(bq.zero_points.T), bq.bits)
    idx, out = node.inputs[1], node.outputs[0]
    detach(node)
    if contrib:
        attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": bq.block}
        if bq.bits == 8:
            attrs["bits"] = 8
        name = unique_name(graph, f"{base}_Q{bq.bits}")
        graph.nodes.append(
            gs.Node("GatherBlockQuantized", name, attrs, [codes, idx, scales, zps], [out], CONTRIB_DOMAIN)
        )
        return
    table = gs.Variable(unique_name(graph, f"{base}_table_dq"), np.float32, list(T.values.shape))
    attrs = {"axis": 1, "block_size": bq.block}
    graph.nodes.append(
        gs.Node("DequantizeLinear", unique_name(graph, f"{base}_table_dq"), attrs, [codes, scales, zps], [table])
    )
    graph.nodes.append(gs.Node("Gather", unique_name(graph, f"{base}_Q{bq.bits}"), {"axis": 0}, [table, idx], [out]))


def upgrade_opset(graph: gs.Graph, version: int) -> str | None:
    """Convert the graph's model to default-domain opset `version` (onnx's version converter) and make
    `graph` hold it; None on success, else why not (the graph is then unchanged)."""
    model = export_model(graph)
    try:
        converted = onnx.version_converter.convert_version(model, version)
        onnx.checker.check_model(converted)
    except (ConvertError, onnx.checker.ValidationError, RuntimeError, ValueError, KeyError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return f"opset {graph.opset} could not be converted to {version} ({first})"
    new = import_model(converted)
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
    graph.opset, graph.import_domains = new.opset, new.import_domains
    return None
