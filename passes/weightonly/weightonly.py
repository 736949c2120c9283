"""The `weightonly` pass: block-wise 4/8-bit weights for MatMul / Gemm (and Gather tables), the
activations staying float.

On onnxruntime targets (cpu, cuda) a layer becomes com.microsoft MatMulNBits, a
table GatherBlockQuantized; on openvino the weight becomes a standard blocked
DequantizeLinear (opset 21, converted to it when older) feeding the original op.
Rounding is RTN with a clipping search, or data-aware from the streamed second
moment of each layer's input (`onnxopt.data.moments`): GPTQ error feedback or an
AWQ channel-scale search. Each layer takes int4, int8 or stays float by its
measured latency on the CPU EP (never slower than float) and, with `size`, by
error per byte; every decision is a row of the report.
"""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.data.moments import RowMoments, row_moments
from onnxopt.framework.context import PassContext
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import export_model, iter_graphs
from onnxopt.ir.ops import CONTRIB_TARGETS
from onnxopt.kernels.blockquant import gather_layout
from onnxopt.passes.weightonly.layers import Layer, Table, collect
from onnxopt.passes.weightonly.options import WeightOnlyOptions
from onnxopt.passes.weightonly.plan import allowed_forms, choose, quantize_all
from onnxopt.passes.weightonly.rewrite import BLOCKED_DQ_OPSET, upgrade_opset, write_dq, write_nbits, write_table
from onnxopt.report.tables import count_reasons
from onnxopt.runtime.timing import TimingCache


@register_pass("weightonly")
class WeightOnly(Pass):
    """Block-wise int4/int8 weights (MatMulNBits, or blocked DequantizeLinear) with RTN/GPTQ/AWQ rounding."""

    tolerance = "quantize"

    Options = WeightOnlyOptions
    options: WeightOnlyOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        contrib = ctx.target in CONTRIB_TARGETS
        layers, tables, skipped = collect(graph, o.min_elements, o.gather)
        stats: dict[str, Any] = {"target": ctx.target, "bits": o.bits, "block": o.block}
        if any(g is not graph for g in iter_graphs(graph)):
            stats["bodies"] = "If/Loop/Scan bodies are left alone (main graph only)"
        if not layers and not tables:
            why = count_reasons(skipped, limit=3)
            reason = "no constant MatMul/Gemm weight or Gather table" + (f": {why}" if why else "")
            return PassResult(False, stats, skipped, reason=reason)
        if not contrib and graph.opset < BLOCKED_DQ_OPSET:
            failed = upgrade_opset(graph, BLOCKED_DQ_OPSET)
            if failed is not None:
                rows = [{"node": L.node.name, "op": L.node.op, "reason": failed} for L in layers]
                return PassResult(
                    False, stats, skipped + rows, reason=f"blocked DequantizeLinear needs opset 21: {failed}"
                )
            stats["opset"] = f"converted to {BLOCKED_DQ_OPSET} (blocked DequantizeLinear)"
            layers, tables, skipped = collect(graph, o.min_elements, o.gather)
        moments = _moments(graph, layers, ctx, stats)
        _input_shapes(graph, layers, moments, ctx)
        quantize_all(layers, o, moments)
        cache = TimingCache("weightonly")
        allowed = {L.node.name: allowed_forms(L, o, ctx.target, cache) for L in layers}
        stats.update(choose(layers, allowed, o, contrib))
        for L in layers:
            _write(graph, L, contrib)
        for T in tables:
            write_table(graph, T, gather_layout(T.values, o.bits, o.block), contrib)
        return _result(layers, tables, skipped, stats)


def _result(layers: list[Layer], tables: list[Table], skipped: list[dict], stats: dict[str, Any]) -> PassResult:
    """The pass's result: counts, a row per layer, float layers listed as skipped with the reason."""
    done = [L for L in layers if L.form != "float"]
    stats.update(
        quantized=len(done),
        int4=sum(L.form == "int4" for L in layers),
        int8=sum(L.form == "int8" for L in layers),
        tables=len(tables),
    )
    for L in layers:
        if L.form == "float":
            skipped.append({"node": L.node.name, "op": L.node.op, "reason": L.row.get("why", "left float")})
    rows = [{"node": L.node.name, "op": L.node.op, "K": L.k, "N": L.n, "form": L.form, **L.row} for L in layers]
    changed = bool(done or tables)
    reason = "" if changed else "no layer quantized: " + (count_reasons(rows, "why", 3) or "all left float")
    return PassResult(changed, stats, skipped, rows, reason=reason)


def _write(graph: gs.Graph, L: Layer, contrib: bool) -> None:
    """Rewrite one layer in its chosen form (a float layer is left as it is)."""
    if L.form == "float":
        return
    bq = L.quants[L.form]
    if contrib:
        write_nbits(graph, L, bq, L.accuracy.get(L.form, 0))
        L.row["accuracy_level"] = L.accuracy.get(L.form, 0)
    else:
        write_dq(graph, L, bq)


def _moments(graph: gs.Graph, layers: list[Layer], ctx: PassContext, stats: dict) -> dict[str, RowMoments]:
    """The streamed input second moments of the layers (empty without calibration data)."""
    if ctx.calibration is None or not layers:
        stats["data"] = "none: round to nearest (give --calib for gptq/awq)"
        return {}
    dims = {L.x.name: L.k for L in layers}
    moments = row_moments(export_model(graph), ctx.calibration, dims, desc="weightonly: layer inputs")
    stats["data"] = f"input second moments of {len(dims)} tensors"
    return moments


def _input_shapes(graph: gs.Graph, layers: list[Layer], moments: dict[str, RowMoments], ctx: PassContext) -> None:
    """Each layer's input shape for timing: the largest seen on the data, else inferred (unknown dims 1)."""
    info: dict[str, TensorInfo] | None = None
    for L in layers:
        st = moments.get(L.x.name)
        if st is not None and st.shape:
            L.in_shape = st.shape
            continue
        if info is None:
            info = ctx.analysis("shapes", graph)
        ti = info.get(L.x.name)
        dims = tuple(ti.shape) if ti is not None and ti.shape is not None else (1, L.k)
        L.in_shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)


__all__ = ["Table", "WeightOnly"]
