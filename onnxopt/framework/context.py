"""What a pass runs in: the `PassContext` (calibration data, settings) and its analysis cache.

Analyses that several passes need (shapes, channel groups) are registered with
`@register_analysis(name)` and computed on request through `ctx.analysis(name, graph)`.
A result is cached for the graph it was computed on (by identity: the cache holds
the graph, so its id is never reused while the entry lives). After a pass that
changed the graph the manager drops every analysis except those the pass declares
in `Pass.preserves`, as MLIR's analysis manager does with preserved analyses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import onnx_graphsurgeon as gs

from onnxopt.errors import UserError

log = logging.getLogger(__name__)

#: The runtimes a pipeline can target. "cpu" and "cuda" are onnxruntime's CPU and CUDA execution
#: providers, which run com.microsoft contrib operators; "openvino" (onnxruntime's OpenVINO EP)
#: takes standard ONNX operators only.
TARGETS = ("cpu", "openvino", "cuda")


def check_target(target: str) -> str:
    """`target` if it is one of `TARGETS`, else a UserError naming them."""
    if target not in TARGETS:
        raise UserError(f"unknown target '{target}': choose one of {', '.join(TARGETS)}")
    return target


#: Analyses the context can compute on request: name -> function(graph, ctx) -> value.
ANALYSES: dict[str, Callable[[gs.Graph, PassContext], Any]] = {}


def register_analysis(name: str) -> Callable:
    """Register a function computing an analysis that passes request through `ctx.analysis(name, graph)`."""

    def deco(fn: Callable) -> Callable:
        ANALYSES[name] = fn
        return fn

    return deco


class PassContext:
    """What a pass can ask for besides the graph: cached analyses, calibration data, global settings."""

    def __init__(self, calibration: Any = None, settings: dict[str, Any] | None = None):
        self.calibration = calibration
        self.settings: dict[str, Any] = dict(settings or {})
        self.settings.setdefault("target", "cpu")
        #: (analysis name, id(graph)) -> (graph, value); holding the graph keeps its id unique.
        self._cache: dict[tuple[str, int], tuple[gs.Graph, Any]] = {}

    @property
    def target(self) -> str:
        """The runtime the pipeline optimizes for (one of `TARGETS`; "cpu" unless told)."""
        return str(self.settings["target"])

    def analysis(self, name: str, graph: gs.Graph) -> Any:
        """The named analysis of `graph`, computed once and cached until a pass changes the graph."""
        key = (name, id(graph))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is graph:
            return hit[1]
        if name not in ANALYSES:
            raise KeyError(f"no analysis named '{name}' (known: {', '.join(sorted(ANALYSES))})")
        value = ANALYSES[name](graph, self)
        self._cache[key] = (graph, value)
        return value

    def cached(self) -> list[str]:
        """Names of the analyses currently cached (for any graph), sorted; for tests and debugging."""
        return sorted({name for name, _ in self._cache})

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        """Drop every cached analysis except those named in `keep` (the manager passes the
        `preserves` of a pass that changed the graph; a pass that rewrote the graph halfway
        through its run calls it with nothing kept)."""
        keep = frozenset(keep)
        dropped = [k for k in self._cache if k[0] not in keep]
        for k in dropped:
            del self._cache[k]
        if dropped:
            log.debug("dropped analyses %s (kept %s)", sorted({k[0] for k in dropped}), sorted(keep))

    def require_calibration(self, pass_name: str) -> Any:
        """The calibration data, or a UserError telling the user how to give it."""
        if self.calibration is None:
            raise UserError(
                f"pass '{pass_name}' needs calibration data: give --calib DIR_OR_NPZ "
                f"(a directory of .npz files, one sample each, keys = model input names)"
            )
        return self.calibration
