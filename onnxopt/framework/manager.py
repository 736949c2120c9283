"""The pass manager: runs a pipeline over a graph and owns the instrumentation.

Per pass it records wall time, `changed` (and, when nothing changed, why), the pass's stats
and skipped nodes,
model statistics after the pass, optionally dumps the IR and verifies the model
(`onnx.checker` plus an onnxruntime session) so a broken rewrite is caught at
the pass that made it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxopt.analysis.stats import model_stats
from onnxopt.errors import CheckFailed
from onnxopt.framework.attribution import run_attributed
from onnxopt.framework.context import PassContext
from onnxopt.framework.options import options_dict
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.ir.graph import cleanup, export_model, export_structure, import_model, stage_new_constants
from onnxopt.ir.graph_state import forget_names
from onnxopt.ir.model_io import save_model
from onnxopt.runtime.sessions import make_session

#: What `onnx.checker` raises for an invalid model (ValueError: a proto over 2 GB).
_CHECKER_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)
#: What onnxruntime raises when it cannot load a model (its own exception types derive from Exception only).
_ORT_ERROR_NAMES = ("Fail", "InvalidGraph", "InvalidArgument", "InvalidProtobuf", "NotImplemented", "RuntimeException")
_ORT_LOAD_ERRORS = tuple(getattr(_ort_state, n) for n in _ORT_ERROR_NAMES if hasattr(_ort_state, n)) + (
    RuntimeError,
    ValueError,
    OSError,
)


@dataclass
class PassRecord:
    """Instrumentation of one pass run."""

    name: str
    options: dict[str, Any]
    seconds: float
    changed: bool
    stats: dict[str, Any]
    skipped: list[dict[str, str]]
    details: list[dict[str, Any]]
    after: dict[str, Any] = field(default_factory=dict)
    #: Why the pass changed nothing ("" when it changed the graph).
    reason: str = ""


class PassManager:
    """Runs passes in order over one graph with a shared `PassContext`."""

    def __init__(
        self,
        passes: list[Pass],
        ctx: PassContext | None = None,
        dump_dir: str | os.PathLike | None = None,
        verify_each: bool = False,
        collect_stats: bool = True,
    ):
        self.passes = passes
        self.ctx = ctx or PassContext()
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.verify_each = verify_each
        self.collect_stats = collect_stats
        self.records: list[PassRecord] = []

    def run_model(self, model: onnx.ModelProto, consume: bool = False) -> onnx.ModelProto:
        """Import, run every pass, export.

        The input proto is not modified, unless `consume`: then the result is written
        into it, reusing untouched weights in place (no second copy of a big model).
        """
        graph = import_model(model)
        graph = self.run(graph)
        return export_model(graph, into=model if consume else None)

    def run(self, graph: gs.Graph) -> gs.Graph:
        """Run the pipeline on `graph` in place and return it."""
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(graph, 0, "input")
        for k, p in enumerate(self.passes, start=1):
            forget_names(graph)
            t0 = time.perf_counter()
            result = run_attributed(p, graph, self.ctx)
            if result.changed:
                cleanup(graph)
                stage_new_constants(graph)
                self.ctx.invalidate(keep=p.preserves)
            seconds = time.perf_counter() - t0
            rec = PassRecord(
                p.name,
                options_dict(p.options),
                seconds,
                result.changed,
                result.stats,
                result.skipped,
                result.details,
                reason=noop_reason(p.name, result),
            )
            if self.collect_stats:
                rec.after = model_stats(
                    export_structure(graph), self.ctx.settings.get("input_shapes"), weights_from=graph
                ).to_dict()
            if self.verify_each or self.dump_dir:
                model = export_model(graph)
                if self.verify_each:
                    verify_model(model, f"after pass {k} '{p.name}'")
                if self.dump_dir:
                    self._dump(graph, k, p.name, model)
            self.records.append(rec)
        return graph

    def _dump(self, graph: gs.Graph, k: int, name: str, model: onnx.ModelProto | None = None) -> None:
        assert self.dump_dir is not None, "only called with a dump directory"
        save_model(model if model is not None else export_model(graph), self.dump_dir / f"{k:02d}_{name}.onnx")


def noop_reason(name: str, result: PassResult) -> str:
    """Why a pass changed nothing, for the report: its own `reason`, else a placeholder that says the
    pass broke its contract (never an empty line: a no-op is never silent)."""
    if result.changed:
        return ""
    return result.reason.strip() or f"pass '{name}' changed nothing and gave no reason"


def verify_model(model: onnx.ModelProto, where: str = "") -> None:
    """Raise CheckFailed unless the model passes `onnx.checker` (full) and onnxruntime can load it."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except _CHECKER_ERRORS as exc:
        raise CheckFailed(f"model invalid {where}: {str(exc).strip().splitlines()[0]}") from None
    try:
        make_session(model)
    except _ORT_LOAD_ERRORS as exc:
        raise CheckFailed(
            f"onnxruntime cannot load the model {where}: {str(exc).strip().splitlines()[0][:300]}"
        ) from None
