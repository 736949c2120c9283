"""Operator fusion: fold affine per-channel ops into the weights of the op before them.

First, once: decomposed multi-head self-attention -> com.microsoft Attention for the cpu and cuda
targets (`attention`; left decomposed for openvino). Then rewrites, repeated until none applies:
- BatchNormalization (inference) after Conv / ConvTranspose / Gemm -> new weights and bias;
- Mul / Add by a per-channel constant after Conv / ConvTranspose / Gemm -> weights and bias;
- Mul / Add by a per-channel constant after BatchNormalization -> the BN's scale and bias;
- MatMul(2-D x, constant W) + Add(constant bias) -> Gemm;
- Mul-Mul and Add-Add chains of constants -> one op;
- decomposed LayerNorm and GELU -> one op, Add + LayerNormalization -> SkipLayerNormalization, in the
  form the target runs (`transformer`).
A rewrite applies only when the intermediate tensor has no other consumer and is
not a graph output, when every node it joins lives in the same graph (main graph
or one If/Loop/Scan body: a body may run many times or not at all, so nothing is
moved across that boundary; tensors a body reads from outside count as consumers),
and when the result has exactly the shape of what it replaces. Everything else is
left as it is; BatchNormalizations that cannot be folded are listed with why.
Numbers: `onnxopt.kernels.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import register_pass
from onnxopt.ir.graph import cleanup, iter_graphs, output_owners
from onnxopt.ir.graph_state import pin_output_owners
from onnxopt.passes.fuse.affine import fold_affine, fold_bn
from onnxopt.passes.fuse.attention import fuse_attention
from onnxopt.passes.fuse.chains import matmul_add_to_gemm, merge_chain
from onnxopt.passes.fuse.scope import Scope
from onnxopt.passes.fuse.transformer import TRANSFORMER_COUNTS, TransformerFusions


@register_pass("fuse")
class FuseOperators(Pass):
    """Fold BatchNorm and per-channel Mul/Add into Conv/ConvTranspose/Gemm; MatMul+Add into Gemm."""

    tolerance = "exact"

    @dataclass
    class Options(Pass.Options):
        batchnorm: bool = option(True, "fold BatchNormalization into the Conv/ConvTranspose/Gemm before it")
        affine: bool = option(True, "fold per-channel Mul/Add constants into weights, biases or BN")
        gemm: bool = option(True, "turn MatMul(2-D x, constant W) + Add(constant) into Gemm")
        attention: bool = option(True, "fuse multi-head self-attention into com.microsoft Attention (cpu, cuda)")
        transformer: bool = option(True, "fuse LayerNorm, GELU and (cpu, cuda) SkipLayerNorm patterns for the target")
        max_iterations: int = option(10, "stop after this many rounds", low=1)

    options: Options

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {
            "batchnorm_folded": 0,
            "affine_folded": 0,
            "matmul_add_to_gemm": 0,
            "chains_merged": 0,
            "in_subgraphs": 0,
            **dict.fromkeys(TRANSFORMER_COUNTS, 0),
        }
        tf = TransformerFusions(ctx, graph, self.options.transformer)
        skipped: dict[str, dict[str, str]] = {}
        counts.update(fuse_attention(graph, ctx, skipped) if self.options.attention else {})
        changed = counts.get("attention_fused", 0) > 0
        for _ in range(self.options.max_iterations):
            step = 0
            shapes = ctx.analysis("shapes", graph)
            pin_output_owners(graph, output_owners(graph))  # output tensors keep their identity within a round
            for g in list(iter_graphs(graph)):
                sc = Scope(graph, g, {id(n) for n in g.nodes}, shapes, skipped)
                for node in list(g.nodes):
                    if not node.outputs or not node.inputs:
                        continue  # removed earlier in this round
                    kind = self._fuse_one(sc, node) or tf.fuse(sc, node)
                    if kind:
                        counts[kind] += 1
                        counts["in_subgraphs"] += g is not graph
                        step += 1
            if not step:
                break
            changed = True
            cleanup(graph)
            ctx.invalidate()
        pin_output_owners(graph, None)
        reason = (
            ""
            if changed
            else (
                "nothing to fuse: no BatchNormalization, Mul/Add into a neighbouring layer "
                "or chain, MatMul+Add that can be merged, or LayerNorm/GELU pattern"
                + (f" ({len(skipped)} left alone, see skipped)" if skipped else "")
            )
        )
        return PassResult(
            changed=changed, stats=counts | tf.stats(counts), skipped=list(skipped.values()), reason=reason
        )

    def _fuse_one(self, sc: Scope, node: gs.Node) -> str | None:
        """Apply the first rewrite that fits `node`; the name of its counter, or None."""
        o = self.options
        if node.op == "BatchNormalization" and o.batchnorm and fold_bn(sc, node):
            return "batchnorm_folded"
        if node.op in ("Mul", "Add") and o.affine and fold_affine(sc, node):
            return "affine_folded"
        if node.op in ("Mul", "Add") and o.affine and merge_chain(sc, node):
            return "chains_merged"
        if node.op == "MatMul" and o.gemm and matmul_add_to_gemm(sc, node):
            return "matmul_add_to_gemm"
        return None
