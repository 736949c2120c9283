"""The options of the lowrank pass, in their own module so that the pass's modules can name their type."""

from __future__ import annotations

from dataclasses import dataclass

from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass
from onnxopt.verify.accuracy_guard import GuardOptions


@dataclass
class LowRankOptions(GuardOptions, Pass.Options):  # Pass.Options (no fields): the type `Pass.options` has
    """The guard's options (`min_cosine`, ...) come first; with the guard, the layers that cost most error
    per parameter saved stay dense."""

    energy: float = option(
        0.98,
        "per-layer share of the (whitened, with data) spectrum's energy to keep, when no global budget is given",
        above=0,
        high=1,
    )
    params: float | None = option(
        None, "global budget: fraction of the factorizable layers' parameters to remove (e.g. 0.3)", low=0, below=1
    )
    error: float | None = option(
        None,
        "global budget: root-sum-square of the layers' relative output "
        "errors on the calibration data (weight errors with method=svd)",
        low=0,
    )
    multiple: int = option(8, "round ranks to a multiple of this (hardware-friendly widths)", low=1)
    method: str = option(
        "auto", "auto (whiten with calibration data, else svd) | whiten | svd", choices=("auto", "whiten", "svd")
    )
    timing: bool = option(True, "time dense vs factorized on onnxruntime CPU and keep the faster")
    min_speedup: float = option(1.05, "factorize only where dense/factorized time >= this", above=0)
    rounds: int = option(4, "budget re-allocations after layers lose to their dense form in timing", low=0)
    measure: int = option(4, "calibration samples for the measured (in-model) error; 0 = skip", low=0)
    ops: list[str] = option(
        ["Gemm", "MatMul"],
        "layer types to factorize; add Conv for 1x1 convolutions "
        "(opt-in: errors in a CNN backbone compound, see bench/lowrank)",
        choices=("Gemm", "MatMul", "Conv"),
    )
    share: bool = option(
        False, "layers reading the same input (Q, K, V projections) share the first factor: x A is computed once"
    )
    min_params: int = option(1024, "leave layers with fewer weight parameters alone", low=0)
    eps: float = option(1e-6, "damping of the covariance, relative to its mean diagonal", low=0)
