"""Operator fusion: the pass (`fusing`), the graph it works in (`scope`), affine ops folded into
weights and BatchNorms (`affine`), and constant chains and MatMul+Add merged (`chains`)."""

from onnxopt.passes.fuse.fusing import FuseOperators

__all__ = ["FuseOperators"]
