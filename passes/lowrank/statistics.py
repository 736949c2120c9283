"""What the lowrank pass learns from calibration data: the streamed covariance of each layer's input
(for whitening), the largest input shapes (for timing), each layer's error curve over the ranks, and
the error of the factorized layers measured inside the rewritten model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import concrete_input_shapes, infer_tensor_info
from onnxopt.data.observe import observe
from onnxopt.framework.context import PassContext
from onnxopt.ir.graph import export_model
from onnxopt.kernels.lowrank import CovarianceAccumulator
from onnxopt.kernels.lowrank_budget import output_energy, plain_error_curve, whitened_error_curve
from onnxopt.passes.lowrank.layers import Layer, skip_rows


class InputStats:
    """Streamed covariance of one tensor read as rows of every layout its layers need; keeps the largest shape."""

    def __init__(self, dims: dict[str, int]):
        self.accs = {layout: CovarianceAccumulator(d) for layout, d in dims.items()}
        self.shape: tuple[int, ...] = ()

    def update(self, x: np.ndarray) -> None:
        """Add one sample of the tensor."""
        x = np.asarray(x)
        if x.size > int(np.prod(self.shape or (0,))):
            self.shape = tuple(x.shape)
        for layout, acc in self.accs.items():
            acc.update(_rows(x, layout))

    def merge(self, other: InputStats) -> None:
        """Add the sums of another pass over more samples (layouts this one also observes)."""
        for layout, acc in self.accs.items():
            if layout in other.accs:
                acc.merge(other.accs[layout])


def _rows(x: np.ndarray, layout: str) -> np.ndarray:
    """The input as rows [-1, m] of the matrix product the layer computes."""
    if layout == "channel":
        return np.moveaxis(x, 1, -1)
    if layout == "transposed":
        return x.T
    return x


def observe_inputs(model: onnx.ModelProto, layers: list[Layer], calib: Any, covariance: bool) -> dict[str, InputStats]:
    """Stream the calibration data: input covariances (when whitening) and the largest input shapes."""
    dims: dict[str, dict[str, int]] = {}
    for L in layers:
        dims.setdefault(L.x.name, {})
        if covariance:
            dims[L.x.name][L.layout] = L.m
    return observe(
        model,
        calib,
        list(dims),
        lambda name: InputStats(dims[name]),
        desc="lowrank: layer inputs",
        total=len(calib),
    )


def finite_inputs(layers: list[Layer], moments: dict[str, InputStats], skipped: list[dict[str, str]]) -> list[Layer]:
    """The layers whose observed input statistics are finite; the others stay dense, listed in `skipped`
    (an inf/NaN upstream reaches them on the calibration data, and no factorization can be fit to it)."""
    kept = []
    for L in layers:
        st = moments.get(L.x.name)
        if st is not None and not all(acc.finite() for acc in st.accs.values()):
            skipped.extend(skip_rows(L, "input holds inf/NaN on the calibration data: left dense"))
            continue
        kept.append(L)
    return kept


def set_input_shapes(
    model: onnx.ModelProto, layers: list[Layer], moments: dict[str, InputStats], ctx: PassContext
) -> None:
    """Input shape of each layer for timing: the largest calibration shape, else inferred (dynamic -> 1)."""
    info = None
    for L in layers:
        st = moments.get(L.x.name)
        if st is not None and st.shape:
            L.in_shape = st.shape
            continue
        if info is None:
            info = infer_tensor_info(model, concrete_input_shapes(model, _pinned_shapes(ctx)))
        ti = info.get(L.x.name)
        dims = tuple(ti.shape) if ti is not None and ti.shape is not None else (1, L.m)
        L.in_shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)


def _pinned_shapes(ctx: PassContext) -> dict[str, tuple] | None:
    """The input shapes to infer at: given ones, else the first calibration sample's."""
    pinned = ctx.settings.get("input_shapes")
    if not pinned and ctx.calibration is not None:
        pinned = {k: tuple(v.shape) for k, v in next(iter(ctx.calibration)).items()}
    return pinned


def whitening_matrix(L: Layer, acc: CovarianceAccumulator) -> np.ndarray:
    """Centered covariance where the bias can absorb the mean error, else the second moment."""
    return acc.covariance() if L.can_add_bias else acc.second_moment()


def error_curve(L: Layer, moments: dict[str, InputStats], whiten: bool, eps: float) -> np.ndarray:
    """The layer's relative error at every rank: of its output on the data when whitening, else of W."""
    if not whiten:
        return plain_error_curve(L.W)
    acc = moments[L.x.name].accs[L.layout]
    energy = output_energy(L.W, acc.second_moment(), acc.mean(), L.bias)
    return whitened_error_curve(L.W, whitening_matrix(L, acc), energy, eps)


class _Keep:
    """Observer keeping every array (a handful of samples for the measured error)."""

    def __init__(self) -> None:
        self.values: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        self.values.append(np.array(x))


def measure_errors(before: onnx.ModelProto, graph: gs.Graph, done: list[Layer], samples: list) -> None:
    """Relative error of each factorized layer's output inside the rewritten model vs the original
    (into its row's `measured_error`)."""
    after = export_model(graph)
    names = [M.output.name for L in done for M in (L.members or [L])]
    ref = observe(before, samples, names, lambda _: _Keep(), desc="lowrank: measuring (original)")
    new = observe(after, samples, names, lambda _: _Keep(), desc="lowrank: measuring (factorized)")
    for L in done:
        num = den = 0.0
        for M in L.members or [L]:
            a, b = ref[M.output.name].values, new[M.output.name].values
            num += sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b))
            den += sum(float(np.sum(x.astype(np.float64) ** 2)) for x in a)
        L.row["measured_error"] = round(float(np.sqrt(num / den)), 6) if den > 0 else 0.0
