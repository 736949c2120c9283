"""Low-rank factorization of weight matrices: the pass (`factorizer`) and its steps (`layers`,
`statistics`, `ranks`, `timing`, `rewrite`)."""

from onnxopt.passes.lowrank.factorizer import LowRank

__all__ = ["LowRank"]
