"""The options of the prune pass, in their own module so that the plan's modules can name their type."""

from __future__ import annotations

from dataclasses import dataclass

from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass
from onnxopt.verify.accuracy_guard import GuardOptions

CRITERIA = ("auto", "l1", "l2", "bn", "activation", "recon")
COMPENSATIONS = ("auto", "none", "bias", "refit")


@dataclass
class PruneOptions(GuardOptions, Pass.Options):  # Pass.Options (no fields): the type `Pass.options` has
    """The guard's options (`min_cosine`, ...) come first; with the guard, the budget shrinks (the
    last-chosen channels stay)."""

    macs: float = option(
        0.3, "fraction of the model's MACs to remove (0 with exact=true: dead channels only)", low=0, below=1
    )
    criterion: str = option(
        "auto", "importance: l1, l2, bn, activation, recon (auto: recon with data, else l1)", choices=CRITERIA
    )
    compensate: str = option(
        "auto",
        "none, bias (fold the mean), refit (ridge least squares); auto: refit with data",
        choices=COMPENSATIONS,
    )
    max_ratio: float = option(0.3, "at most this fraction of one group's channels is removed", low=0, below=1)
    round_to: int = option(
        8, "kept channel counts are multiples of this (ORT CPU kernels block channels by 8/16; 1 = any)", low=1
    )
    protect: list[str] = option([], "name patterns (fnmatch) of nodes whose channels are never pruned")
    exact: bool = option(False, "only remove provably dead channels (outputs unchanged)")
    ridge: float = option(1e-3, "ridge strength of the refit, relative to the mean channel variance", low=0)
