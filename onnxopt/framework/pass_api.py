"""What a pass is: the `Pass` base class and the `PassResult` it returns.

A pass is stateless between runs. Its options are a dataclass named `Options`
nested in the class; pipeline text such as `prune{macs=0.3}` fills it
(`onnxopt.framework.options`). Numbers are computed in `onnxopt.kernels`; a pass
only reads and rewrites the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxopt.framework import options as _options
from onnxopt.framework.context import PassContext


@dataclass
class PassResult:
    """What a pass did: `changed` must be honest (a contract test checks it against a graph hash)."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    #: Nodes the pass could not handle and left alone, with the reason, for the report.
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: Per-layer details (quantize/prune/lowrank tables); free-form rows.
    details: list[dict[str, Any]] = field(default_factory=list)
    #: Why nothing changed (required when `changed` is False: a pass is never a silent no-op).
    reason: str = ""


class Pass:
    """Base class of every rewrite pass; subclass it and decorate with `@register_pass("name")`."""

    name: ClassVar[str] = ""
    #: Tolerance class used by checks and validation: "exact", "quantize" or "approximate".
    tolerance: ClassVar[str] = "exact"
    #: True if the pass cannot work without calibration data.
    needs_data: ClassVar[bool] = False
    #: Analyses (names given to `register_analysis`) still valid after this pass changed the graph;
    #: every other cached analysis is dropped by the manager.
    preserves: ClassVar[tuple[str, ...]] = ()
    #: True if a second run on the pass's own output changes nothing (checked by the pass contract,
    #: `onnxopt.testing.check_pass_contract`); budgeted passes (prune 30% more) are not.
    idempotent: ClassVar[bool] = True

    @dataclass
    class Options:
        pass

    def __init__(self, options: Pass.Options | None = None):
        self.options = options if options is not None else self.Options()
        self.check_options(self.options)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def parse_options(cls, raw: dict[str, str]) -> Pass.Options:
        """Build the Options dataclass from text values, with one clear error per mistake."""
        return _options.parse_options(cls.name or cls.__name__, cls.Options, raw)

    @classmethod
    def check_options(cls, options: Pass.Options) -> None:
        """Raise a UserError naming the pass, the option, the bad value and what is allowed."""
        _options.check_options(cls.name or cls.__name__, options)

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type with the values it accepts, default, help) for each option."""
        return _options.option_docs(cls.Options)
