"""Stream samples through a model and feed chosen tensors to observers, in bounded memory.

The one loop every data-driven statistic goes through: calibration
(`onnxopt.data.calibration`), its sharded form (`onnxopt.data.sharded_calibration`)
and the passes that observe tensors themselves. Each sample runs once through
onnxruntime with the observed tensors exposed as extra outputs; each observer
is updated and the arrays dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx

from onnxopt.analysis.shapes import infer_tensor_info
from onnxopt.data.samples import Sample
from onnxopt.report.progress import progress
from onnxopt.runtime.sessions import make_session, session_options


class Observer(Protocol):
    """Anything with `update(array)`; the kernels' observers also `merge`."""

    def update(self, x: np.ndarray) -> Any: ...


class MergeableObserver(Observer, Protocol):
    """An observer whose statistics of two shards of the data merge into those of the whole."""

    def merge(self, other: Any) -> Any: ...


ObserverT = TypeVar("ObserverT", bound=Observer)


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (typed from shape inference where known)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    info = infer_tensor_info(model)
    for name in tensors:
        if name in existing:
            continue
        ti = info.get(name)
        vi = (
            onnx.helper.make_tensor_value_info(name, ti.elem_type, None)
            if ti and ti.elem_type
            else onnx.ValueInfoProto(name=name)
        )
        out.graph.output.append(vi)
        existing.add(name)
    return out


def observe(
    model: onnx.ModelProto,
    samples: Iterable[Sample],
    tensors: list[str],
    make_observer: Callable[[str], ObserverT],
    desc: str = "calibrating",
    total: int | None = None,
    threads: int = 2,
    chunk: int = 256,
) -> dict[str, ObserverT]:
    """Stream `samples` through `model` and feed each observed tensor to its own observer.

    Tensors are exposed in chunks of `chunk` per session, so a model with many
    large activations does not hold them all at once; with one chunk the data is
    read once. The observers of one sample are updated on a single helper
    thread while onnxruntime (which releases the GIL) runs the next sample, so
    updates keep the sample order (same statistics) and at most two samples'
    outputs are alive at once. Returns {tensor name: observer}.
    """
    observers = {t: make_observer(t) for t in tensors}
    graph_outputs = [o.name for o in model.graph.output]
    groups = [tensors[i : i + chunk] for i in range(0, len(tensors), chunk)] or [[]]
    for gi, group in enumerate(groups):
        so = session_options(threads, optimize=False)
        # idle onnxruntime threads would spin against the updater thread for the same cores
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = make_session(with_outputs(model, group), so=so)
        names = list(dict.fromkeys(group + [o for o in graph_outputs if o in observers]))
        label = desc if len(groups) == 1 else f"{desc} ({gi + 1}/{len(groups)})"
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[None] | None = None
            for feeds in progress(samples, label, total=total, unit="sample"):
                values = sess.run(names, feeds)
                if pending is not None:
                    pending.result()
                pending = pool.submit(_update_all, observers, names, values)
            if pending is not None:
                pending.result()
    return observers


def _update_all(observers: Mapping[str, Observer], names: list[str], values: list[np.ndarray]) -> None:
    """Feed one sample's outputs to their observers (in `names` order, on the single updater thread)."""
    for name, value in zip(names, values):
        observers[name].update(value)
