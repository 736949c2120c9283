"""What a pass is: the `Pass` base class, its result, and the context it runs in.

A pass is stateless between runs. Its options are a dataclass named `Options`
nested in the class; pipeline text such as `prune{macs=0.3}` fills it. Numbers
are computed in `onnxopt.kernels`; a pass only reads and rewrites the graph.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
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
    #: Why nothing changed (required when `changed` is False: a pass is never a silent no-op).
    reason: str = ""


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
        self.check_options(self.options)

    def run(self, graph: gs.Graph, ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def parse_options(cls, raw: dict[str, str]) -> "Pass.Options":
        """Build the Options dataclass from text values, with one clear error per mistake.

        Every value is converted to its field's type and checked against what the field
        accepts (see `option`), so a bad value stops the run before any pass has run.
        """
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        values: dict[str, Any] = {}
        for key, text in raw.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise UserError(f"pass '{cls.name}': unknown option '{key}' (options: {known})")
            values[key] = _coerce(cls.name, key, text, hints[key])
        options = cls.Options(**values)
        cls.check_options(options)
        return options

    @classmethod
    def check_options(cls, options: "Pass.Options") -> None:
        """Raise a UserError naming the pass, the option, the bad value and what is allowed."""
        if not dataclasses.is_dataclass(options):
            return
        for f in dataclasses.fields(options):
            _check_value(cls.name or cls.__name__, f.name, getattr(options, f.name), f.metadata)

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type with the values it accepts, default, help) for each option."""
        hints = typing.get_type_hints(cls.Options)
        rows = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((f.name, _type_name(hints[f.name], f.metadata), default, f.metadata.get("help", "")))
        return rows


def _compile_regex(text: str) -> None:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None


#: Option kinds checked at parse time: name -> function(value) raising ValueError with the reason.
OPTION_KINDS: dict[str, Callable[[Any], None]] = {"regex": _compile_regex}


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           above: float | None = None, below: float | None = None, choices: Iterable[Any] | None = None,
           kind: str | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
    """A dataclass field with a help text shown by `onnxopt passes`, and the values it accepts.

    `low`/`high` are inclusive bounds, `above`/`below` strict ones; `choices` lists
    the allowed values (a `Literal[...]` type does the same); `kind="regex"` compiles
    the text; `check(value)` returns an error message or None. Each element of a list
    option is checked; float values must be finite. The checks run when pipeline text
    is parsed and when a pass is built from Python, before any pass runs.
    """
    if kind is not None and kind not in OPTION_KINDS:
        raise ValueError(f"unknown option kind '{kind}' (known: {', '.join(OPTION_KINDS)})")
    meta = {"help": help, "low": low, "high": high, "above": above, "below": below,
            "choices": tuple(choices) if choices is not None else None, "kind": kind, "check": check}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _bounds(meta: Mapping[str, Any], name: str = "x") -> str:
    """The numeric range of a field in words ('0 <= macs < 1', 'multiple >= 1'), '' if unbounded."""
    lo = (">=", meta["low"]) if meta.get("low") is not None else (
        (">", meta["above"]) if meta.get("above") is not None else None)
    hi = ("<=", meta["high"]) if meta.get("high") is not None else (
        ("<", meta["below"]) if meta.get("below") is not None else None)
    if lo and hi:
        return f"{lo[1]:g} {lo[0].replace('>', '<')} {name} {hi[0]} {hi[1]:g}"
    one = lo or hi
    return f"{name} {one[0]} {one[1]:g}" if one else ""


def _allowed(meta: Mapping[str, Any], name: str) -> str:
    """What a field accepts, in words, for error messages ('' when its type says it all)."""
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    return _bounds(meta, name)


def _out_of_range(v: float, meta: Mapping[str, Any]) -> bool:
    return ((meta.get("low") is not None and v < meta["low"]) or (meta.get("high") is not None and v > meta["high"])
            or (meta.get("above") is not None and v <= meta["above"])
            or (meta.get("below") is not None and v >= meta["below"]))


def _check_value(pass_name: str, key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Check one option value (each element of a list) against the field's metadata."""
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(pass_name, key, v, meta)
        return
    if value is None:
        return
    problem = None
    if isinstance(value, float) and not math.isfinite(value):
        problem = "is not a finite number"
    elif meta.get("choices") and value not in meta["choices"]:
        problem = "is not allowed"
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and _out_of_range(value, meta):
        problem = "is out of range"
    elif meta.get("kind"):
        try:
            OPTION_KINDS[meta["kind"]](value)
        except ValueError as exc:
            problem = str(exc)
    if problem is None and meta.get("check") is not None:
        problem = meta["check"](value)
    if problem:
        allowed = _allowed(meta, key)
        raise UserError(f"pass '{pass_name}': option '{key}' = {value!r} {problem}"
                        + (f" (allowed: {allowed})" if allowed else ""))


def _type_name(tp: Any, meta: Mapping[str, Any] | None = None) -> str:
    """A type as users read it (`float`, `int|None`, `list[str]`, `a|b|c`), with its range when it has one."""
    origin = typing.get_origin(tp)
    if meta and meta.get("choices"):
        args = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else ()
        base = "|".join(str(c) for c in meta["choices"]) + ("|None" if type(None) in args else "")
        return f"list[{base}]" if origin is list else base
    if meta and _bounds(meta):
        return f"{_type_name(tp)} {_bounds(meta).replace(' ', '')}".replace(" x", "")
    if meta and meta.get("kind"):
        return f"{_type_name(tp)}({meta['kind']})"
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


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
    if origin is typing.Literal:
        for a in args:
            if text == str(a):
                return a
        raise UserError(f"pass '{pass_name}': option '{key}' = '{text}' is not allowed "
                        f"(allowed: one of {', '.join(str(a) for a in args)})")
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
