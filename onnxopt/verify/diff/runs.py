"""Running a model with some of its inner tensors as outputs, in bounded memory.

A model's weights are moved to the staging directory once (`stage_weights`), so
the proto left in memory is a skeleton and every onnxruntime session maps the
weights from disk instead of holding a copy: a chunk's session costs the
model's size once, however many chunks are run. A chunk exposes only its own
tensors as graph outputs (`exposing`), so onnxruntime keeps only those beyond
their last use, never every intermediate tensor at once.

Sessions run with graph optimizations off: an inner tensor marked as an output
would stop onnxruntime from fusing across it, so with optimizations on the
values would depend on the chunking; off, they are those of the graph as the
passes wrote it (what `validate`'s pass check runs too).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.data.samples import Sample
from onnxopt.errors import UserError
from onnxopt.ir import external_data, weights
from onnxopt.runtime.sessions import ORT_ERRORS, make_session
from onnxopt.verify.ep import provider_name
from onnxopt.verify.ep.envs import resolve_interpreter
from onnxopt.verify.ep.runner import WorkerJob, run_worker, write_inputs

#: Initializers at least this big go to the staging directory; smaller ones stay in the proto.
STAGE_BYTES = 1 << 16


def stage_weights(model: onnx.ModelProto) -> None:
    """Move the model's large in-memory initializers to the staging directory (in place)."""
    for t in model.graph.initializer:
        if weights.is_external(t) or t.data_type not in (1, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13):
            continue
        if len(t.raw_data) >= STAGE_BYTES or (not t.raw_data and _field_bytes(t) >= STAGE_BYTES):
            weights.spill(numpy_helper.to_array(t), t)


def _field_bytes(t: onnx.TensorProto) -> int:
    """Rough size of a tensor stored in typed fields (float_data, int32_data, ...) rather than raw_data."""
    return 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))


@contextmanager
def exposing(model: onnx.ModelProto, names: list[str]) -> Iterator[onnx.ModelProto]:
    """`model` with exactly `names` as its graph outputs, restored afterwards (no copy of the model).

    Outputs are declared without a type: onnxruntime infers it.
    """
    kept = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    try:
        yield model
    finally:
        del model.graph.output[:]
        model.graph.output.extend(kept)


class ChunkRun:
    """The values of some tensors of a model, sample by sample, on the CPU EP in this process."""

    def __init__(self, model: onnx.ModelProto, names: list[str]):
        self.names = names
        with exposing(model, names) as m:
            try:
                self.session = make_session(m, threads=2, optimize=False)
            except ORT_ERRORS as exc:
                raise UserError(f"onnxruntime cannot run the model with inner outputs: {_first_line(exc)}") from None

    def values(self, sample: Sample) -> dict[str, np.ndarray]:
        """The chunk's tensors on one sample, by name."""
        feeds = {i.name: sample[i.name] for i in self.session.get_inputs()}
        return dict(zip(self.names, self.session.run(self.names, feeds)))


class EpChunkRun:
    """The values of some tensors of a model on another execution provider, run in a worker process over
    all samples at once (the worker needs its inputs in a file)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], ep: str, samples: list[Sample]):
        self.names = names
        interp = resolve_interpreter(ep)
        if not interp.available or interp.python is None:
            raise UserError(f"execution provider {ep} is not available here: {interp.reason}")
        inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        with tempfile.TemporaryDirectory(prefix="onnxopt-diff-") as tmp, exposing(model, names) as m:
            path = external_data.session_model(m)
            try:
                npz = Path(tmp) / "inputs.npz"
                write_inputs(npz, samples, inputs)
                job = WorkerJob(str(path), provider_name(ep), graph_optimization_level="disable")
                result = run_worker(interp.python, job, npz, inputs, len(samples))
            finally:
                external_data.remove_session_model(path)
        if not result.ok:
            raise UserError(f"the candidate does not run on {ep}: {result.error}")
        self._outputs = iter(result.outputs)

    def values(self, sample: Sample) -> dict[str, np.ndarray]:
        """The chunk's tensors on the next sample (samples are taken in the order they were given)."""
        return next(self._outputs)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
