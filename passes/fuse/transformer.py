"""The transformer fusions of the fuse pass, one entry point for `fusing`: LayerNormalization from its
decomposed form (`layernorm`), GELU (`gelu`) and SkipLayerNormalization (`skiplayernorm`); the
fused form each gets depends on the pipeline's target and the model's opset (`matching`)."""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from onnxopt.framework.context import PassContext
from onnxopt.passes.fuse.gelu import fuse_gelu
from onnxopt.passes.fuse.layernorm import fuse_layernorm
from onnxopt.passes.fuse.matching import FusionTarget
from onnxopt.passes.fuse.scope import Scope
from onnxopt.passes.fuse.skiplayernorm import fuse_skip_layernorm

#: The counters of `TransformerFusions.fuse`'s rewrites.
TRANSFORMER_COUNTS = ("layernorm_fused", "gelu_fused", "bias_gelu_fused", "skip_layernorm_fused")


#: The ops a transformer rewrite starts from.
_ANCHORS = ("ReduceMean", "Erf", "Tanh", "LayerNormalization")


class TransformerFusions:
    """The transformer rewrites of one run of the pass, for its target (`ctx.target`)."""

    def __init__(self, ctx: PassContext, graph: gs.Graph, enabled: bool = True):
        self.target = FusionTarget(ctx, graph)
        self.enabled = enabled

    def fuse(self, sc: Scope, node: gs.Node) -> str | None:
        """Apply the transformer rewrite anchored at `node`, if one fits; the name of its counter, or None."""
        if not self.enabled or node.domain not in (None, "", "ai.onnx") or node.op not in _ANCHORS:
            return None
        sc = self.target.scope(sc)
        if node.op == "ReduceMean" and fuse_layernorm(self.target, sc, node):
            return "layernorm_fused"
        if node.op in ("Erf", "Tanh"):
            return fuse_gelu(self.target, sc, node)
        if node.op == "LayerNormalization" and self.target.contrib and fuse_skip_layernorm(self.target, sc, node):
            return "skip_layernorm_fused"
        return None

    def stats(self, counts: dict[str, int]) -> dict[str, Any]:
        """What to add to the pass's stats: patterns left decomposed, and the target when any was seen."""
        left = {note: len(names) for note, names in sorted(self.target.left.items())}
        seen = sum(counts.get(k, 0) for k in TRANSFORMER_COUNTS) + sum(left.values())
        return {**left, "target": self.target.ctx.target} if seen else {}
