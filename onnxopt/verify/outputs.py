"""A model's outputs on samples, and how far a candidate's are from them (SQNR).

Shared by every pass that measures its own effect on the outputs (quantize's sensitivity
trials, the accuracy guard of prune and lowrank), so a change scores the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.data.samples import Sample
from onnxopt.ir.weights import has_external
from onnxopt.kernels.metrics import sqnr_db
from onnxopt.runtime.sessions import make_session

#: SQNR above this is "identical" (keeps means finite when a trial changes nothing).
SQNR_CAP_DB = 200.0


def output_sqnr(
    model: onnx.ModelProto, samples: Sequence[Sample], reference: Sequence[list[np.ndarray]], threads: int = 2
) -> float:
    """Mean over samples of the worst output's SQNR (dB, capped) of `model` against `reference` outputs."""
    sess = _accuracy_session(model, threads)
    vals = [min(sqnr_db(r, o) for r, o in zip(ref, sess.run(None, feeds))) for feeds, ref in zip(samples, reference)]
    return float(np.mean(np.minimum(vals, SQNR_CAP_DB)))


def reference_outputs(model: onnx.ModelProto, samples: Sequence[Sample], threads: int = 2) -> list[list[np.ndarray]]:
    """The float model's outputs on each sample."""
    sess = _accuracy_session(model, threads)
    return [sess.run(None, feeds) for feeds in samples]


def _accuracy_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """A session to compare outputs with. For a big model (weights staged on disk) graph optimizations
    are off: folding its int8-stored weights back to float at load would hold every layer's float
    weight (and the Cast between) at once, about three times the model; unoptimized, each is computed
    per run and freed. Reference and candidates of one model are both big or both not, so alike."""
    return make_session(model, threads=threads, optimize=not has_external(model))
