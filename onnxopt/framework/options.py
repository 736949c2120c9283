"""Pass options: `option()` fields, and turning pipeline text into a checked `Options` dataclass.

A pass's options are a dataclass named `Options` nested in the pass. Each field's
type says how its text is converted (bool, int, float, str, `X | None`, `list[X]`
via '|' or ';', `Literal[...]`, an `Enum`); `option()` adds a help line and the
values the field accepts. Everything is checked when the pipeline text is parsed,
before any pass runs, and again when a pass is built from Python.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from typing import Any

from onnxopt.errors import UserError

_UNIONS = (typing.Union, types.UnionType)


def _compile_regex(text: str) -> None:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None


#: Option kinds checked at parse time: name -> function(value) raising ValueError with the reason.
OPTION_KINDS: dict[str, Callable[[Any], None]] = {"regex": _compile_regex}


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: Iterable[Any] | None = None,
    kind: str | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with a help text shown by `onnxopt passes`, and the values it accepts.

    `low`/`high` are inclusive bounds, `above`/`below` strict ones; `choices` lists
    the allowed values (a `Literal[...]` or `Enum` type does the same); `kind="regex"`
    compiles the text; `check(value)` returns an error message or None. Each element
    of a list option is checked; float values must be finite. The checks run when
    pipeline text is parsed and when a pass is built from Python, before any pass runs.
    """
    if kind is not None and kind not in OPTION_KINDS:
        raise ValueError(f"unknown option kind '{kind}' (known: {', '.join(OPTION_KINDS)})")
    meta = {
        "help": help,
        "low": low,
        "high": high,
        "above": above,
        "below": below,
        "choices": tuple(choices) if choices is not None else None,
        "kind": kind,
        "check": check,
    }
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _type_choices(tp: Any) -> tuple[Any, ...] | None:
    """The values a type allows by itself: `Literal` arguments or `Enum` members (inside
    `X | None` and `list[X]` too), else None."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    if _is_enum(tp):
        return tuple(tp)
    if origin in _UNIONS or origin is list:
        for arg in typing.get_args(tp):
            found = _type_choices(arg)
            if found is not None:
                return found
    return None


def _field_meta(f: dataclasses.Field, tp: Any) -> dict[str, Any]:
    """A field's metadata with `choices` filled from its type when `option()` gave none."""
    meta = dict(f.metadata)
    if not meta.get("choices"):
        meta["choices"] = _type_choices(tp)
    return meta


def _shown(value: Any) -> str:
    """A value as users write it in pipeline text (an Enum member by its value)."""
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def _bounds(meta: Mapping[str, Any], name: str = "x") -> str:
    """The numeric range of a field in words ('0 <= macs < 1', 'multiple >= 1'), '' if unbounded."""
    lo = (
        (">=", meta["low"])
        if meta.get("low") is not None
        else ((">", meta["above"]) if meta.get("above") is not None else None)
    )
    hi = (
        ("<=", meta["high"])
        if meta.get("high") is not None
        else (("<", meta["below"]) if meta.get("below") is not None else None)
    )
    if lo and hi:
        return f"{lo[1]:g} {lo[0].replace('>', '<')} {name} {hi[0]} {hi[1]:g}"
    one = lo or hi
    return f"{name} {one[0]} {one[1]:g}" if one else ""


def _allowed(meta: Mapping[str, Any], name: str) -> str:
    """What a field accepts, in words, for error messages ('' when its type says it all)."""
    if meta.get("choices"):
        return "one of " + ", ".join(_shown(c) for c in meta["choices"])
    return _bounds(meta, name)


def _out_of_range(v: float, meta: Mapping[str, Any]) -> bool:
    return (
        (meta.get("low") is not None and v < meta["low"])
        or (meta.get("high") is not None and v > meta["high"])
        or (meta.get("above") is not None and v <= meta["above"])
        or (meta.get("below") is not None and v >= meta["below"])
    )


def _problem(value: Any, meta: Mapping[str, Any]) -> str | None:
    """Why one (scalar) option value is not accepted, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number"
    if meta.get("choices") and value not in meta["choices"]:
        return "is not allowed"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _out_of_range(value, meta):
        return "is out of range"
    if meta.get("kind"):
        try:
            OPTION_KINDS[meta["kind"]](value)
        except ValueError as exc:
            return str(exc)
    return meta["check"](value) if meta.get("check") is not None else None


def _check_value(pass_name: str, key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Check one option value (each element of a list) against the field's metadata."""
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_value(pass_name, key, v, meta)
        return
    if value is None:
        return
    problem = _problem(value, meta)
    if problem:
        allowed = _allowed(meta, key)
        shown = value.value if isinstance(value, enum.Enum) else value
        raise UserError(
            f"pass '{pass_name}': option '{key}' = {shown!r} {problem}" + (f" (allowed: {allowed})" if allowed else "")
        )


def _type_name(tp: Any, meta: Mapping[str, Any] | None = None) -> str:
    """A type as users read it (`float`, `int|None`, `list[str]`, `a|b|c`), with its range when it has one."""
    origin = typing.get_origin(tp)
    if meta and meta.get("choices"):
        args = typing.get_args(tp) if origin in _UNIONS else ()
        base = "|".join(_shown(c) for c in meta["choices"]) + ("|None" if type(None) in args else "")
        return f"list[{base}]" if origin is list else base
    if meta and _bounds(meta):
        return f"{_type_name(tp)} {_bounds(meta).replace(' ', '')}".replace(" x", "")
    if meta and meta.get("kind"):
        return f"{_type_name(tp)}({meta['kind']})"
    if origin is typing.Literal or _is_enum(tp):
        return "|".join(_shown(a) for a in _type_choices(tp) or ())
    if origin in _UNIONS:
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce_union(pass_name: str, key: str, text: str, tp: Any) -> Any:
    """Text to the first member of `X | Y | None` that accepts it."""
    args = typing.get_args(tp)
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


def _coerce_choice(pass_name: str, key: str, text: str, tp: Any) -> Any:
    """Text to the `Literal` argument or `Enum` member it spells (an Enum by value or name)."""
    for choice in _type_choices(tp) or ():
        if text == _shown(choice) or (isinstance(choice, enum.Enum) and text == choice.name):
            return choice
    raise UserError(
        f"pass '{pass_name}': option '{key}' = '{text}' is not allowed "
        f"(allowed: one of {', '.join(_shown(a) for a in _type_choices(tp) or ())})"
    )


def _coerce(pass_name: str, key: str, text: str, tp: Any) -> Any:
    """Convert option text to the field's type (bool, int, float, str, optional, list via '|' or ';',
    Literal, Enum)."""
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return _coerce_union(pass_name, key, text, tp)
    if origin is list:
        parts = [p for p in text.replace(";", "|").split("|") if p != ""]
        return [_coerce(pass_name, key, p, typing.get_args(tp)[0]) for p in parts]
    if origin is typing.Literal or _is_enum(tp):
        return _coerce_choice(pass_name, key, text, tp)
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


def parse_options(pass_name: str, options_cls: type, raw: Mapping[str, str]) -> Any:
    """Build an `Options` dataclass from text values, with one clear UserError per mistake.

    Every value is converted to its field's type and checked against what the field
    accepts, so a bad value stops the run before any pass has run.
    """
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise UserError(f"pass '{pass_name}': unknown option '{key}' (options: {known})")
        values[key] = _coerce(pass_name, key, text, hints[key])
    options = options_cls(**values)
    check_options(pass_name, options)
    return options


def check_options(pass_name: str, options: Any) -> None:
    """Raise a UserError naming the pass, the option, the bad value and what is allowed."""
    if not dataclasses.is_dataclass(options):
        return
    try:
        hints = typing.get_type_hints(type(options))
    except NameError:  # annotations naming what the module cannot see: check what `option()` declared
        hints = {}
    for f in dataclasses.fields(options):
        _check_value(pass_name, f.name, getattr(options, f.name), _field_meta(f, hints.get(f.name)))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def option_docs(options_cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type with the values it accepts, default, help) for each option."""
    hints = typing.get_type_hints(options_cls)
    return [
        (
            f.name,
            _type_name(hints[f.name], _field_meta(f, hints[f.name])),
            _plain_all(_default(f)),
            f.metadata.get("help", ""),
        )
        for f in dataclasses.fields(options_cls)
    ]


def options_dict(options: Any) -> dict[str, Any]:
    """An `Options` instance as a JSON-ready dict for the report (Enum members by their value)."""
    if not dataclasses.is_dataclass(options):
        return {}
    assert not isinstance(options, type), "options_dict takes an options instance, not its class"
    return {k: _plain_all(v) for k, v in dataclasses.asdict(options).items()}


def _plain_all(value: Any) -> Any:
    """An option value as users write it: Enum members (alone or in a list) by their value."""
    if isinstance(value, list):
        return [_plain_all(v) for v in value]
    return value.value if isinstance(value, enum.Enum) else value
