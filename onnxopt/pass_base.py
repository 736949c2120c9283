"""What a pass is: the `Pass` base class, its result, and the context it runs in.

A pass is stateless between runs. Its options are a dataclass named `Options`
nested in the class; pipeline text such as `prune{macs=0.3}` fills it. Numbers
are computed in `onnxopt.kernels`; a pass only reads and rewrites the graph.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx_graphsurgeon as gs

from onnxopt.errors import UserError


@dataclass
class PassResult:
    """What a pass did: `changed` must be honest (a contract test checks it against a graph hash)."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    #: Nodes the pass could not handle and left alone, with the reason, for the report.
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: Per-layer details (quantize/prune/lowrank tables); free-form rows.
    details: list[dict[str, Any]] = field(default_factory=list)


class Pass:
    """Base class of every rewrite pass; subclass it and decorate with `@register_pass("name")`."""

    name: ClassVar[str] = ""
    #: Tolerance class used by checks and validation: "exact", "quantize" or "approximate".
    tolerance: ClassVar[str] = "exact"
    #: True if the pass cannot work without calibration data.
    needs_data: ClassVar[bool] = False

    @dataclass
    class Options:
        pass

    def __init__(self, options: "Pass.Options | None" = None):
        self.options = options if options is not None else self.Options()

    def run(self, graph: gs.Graph, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def parse_options(cls, raw: dict[str, str]) -> "Pass.Options":
        """Build the Options dataclass from text values, with one clear error per mistake."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise UserError(f"pass '{cls.name}': unknown option '{key}' (options: {known})")
            values[key] = _coerce(cls.name, key, text, hints[key])
        return cls.Options(**values)

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each option, help from field metadata."""
        hints = typing.get_type_hints(cls.Options)
        rows = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text shown by `onnxopt passes`."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(pass_name: str, key: str, text: str, tp: Any) -> Any:
    """Convert option text to the field's type (bool, int, float, str, optional, list via '|' or ';')."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(pass_name, key, text, a)
            except UserError:
                continue
        raise UserError(f"pass '{pass_name}': option '{key}' expects {_type_name(tp)}, got '{text}'")
    if origin is list:
        parts = [p for p in text.replace(";", "|").split("|") if p != ""]
        return [_coerce(pass_name, key, p, args[0]) for p in parts]
    convert = _CONVERTERS.get(tp)
    if convert is None:
        raise TypeError(f"pass '{pass_name}': option '{key}' has an unsupported type {tp!r}")
    try:
        return convert(text)
    except ValueError:
        raise UserError(f"pass '{pass_name}': option '{key}' expects {_type_name(tp)}, got '{text}'") from None


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_CONVERTERS: dict[Any, Callable[[str], Any]] = {bool: _parse_bool, int: int, float: float, str: str}


#: Analyses the context can compute on request: name -> function(graph, ctx) -> value.
ANALYSES: dict[str, Callable[[gs.Graph, "PassContext"], Any]] = {}


def register_analysis(name: str) -> Callable:
    """Register a function computing an analysis that passes request through `ctx.analysis(name)`."""
    def deco(fn: Callable) -> Callable:
        ANALYSES[name] = fn
        return fn
    return deco


class PassContext:
    """What a pass can ask for besides the graph: cached analyses, calibration data, global settings."""

    def __init__(self, calibration: Any = None, settings: dict[str, Any] | None = None):
        self.calibration = calibration
        self.settings: dict[str, Any] = dict(settings or {})
        self._cache: dict[str, Any] = {}

    def analysis(self, name: str, graph: gs.Graph) -> Any:
        """The named analysis of `graph`, computed once and cached until the graph changes."""
        if name not in self._cache:
            if name not in ANALYSES:
                raise KeyError(f"no analysis named '{name}' (known: {', '.join(sorted(ANALYSES))})")
            self._cache[name] = ANALYSES[name](graph, self)
        return self._cache[name]

    def invalidate(self) -> None:
        """Drop every cached analysis (called by the pass manager after a pass changed the graph)."""
        self._cache.clear()

    def require_calibration(self, pass_name: str) -> Any:
        """The calibration data, or a UserError telling the user how to give it."""
        if self.calibration is None:
            raise UserError(f"pass '{pass_name}' needs calibration data: give --calib DIR_OR_NPZ "
                            f"(a directory of .npz files, one sample each, keys = model input names)")
        return self.calibration
