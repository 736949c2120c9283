"""Constant folding: the pass (`folding`) and the steps it runs, one module each: what may fold
(`selection`) and evaluating it (`evaluation`), `Constant` nodes (`constants`), no-ops and view chains
(`noops`, `views`), constant Ifs (`control_flow`), shape arithmetic (`shape_folding`, `shape_values`)
and common subexpressions (`cse`)."""

from onnxopt.passes.fold.folding import FoldConstants

__all__ = ["FoldConstants"]
