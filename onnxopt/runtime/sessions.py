"""onnxruntime helpers shared by folding, checks, calibration and timing (CPU EP, this process)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxopt.ir import external_data, weights

ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NoModel,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
    RuntimeError,
    ValueError,
    TypeError,
)
"""What onnxruntime raises when a model does not load or run: its own error types (which share no base
class but `Exception`) and the Python errors its wrapper raises for bad feeds."""


def session_options(threads: int = 2, optimize: bool = True) -> ort.SessionOptions:
    """Session options with fixed thread counts (reproducible timings) and quiet logging."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return so


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    threads: int = 2,
    optimize: bool = True,
    so: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """A CPU-EP session for a ModelProto or a path; models over 2 GB or with staged weights
    (`onnxopt.ir.weights`) are loaded from a file in the staging directory, and run without
    onnxruntime's CPU memory arena: the arena keeps every buffer it ever handed out, so a run
    that computes big weights (int8-stored ones, unoptimized) would hold all of them at once
    instead of one layer's at a time (2.9 GB against 1.7 GB for 0.6 GB of int8 weights)."""
    so = so or session_options(threads, optimize)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        if not weights.has_external(model) and external_data.fits_in_protobuf(model):
            return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
        so.enable_cpu_mem_arena = False
        path = external_data.session_model(model)  # staged weights are mapped by onnxruntime, not copied
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        finally:
            external_data.remove_session_model(path)
    return ort.InferenceSession(str(model), so, providers=providers)


def run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run a session and return outputs by name."""
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
