"""The pass registry: built-in passes register themselves; plugins come through entry points.

The core never imports a particular pass. `load_passes()` imports the
`onnxopt.passes` package (which imports its modules) and every entry point in the
`onnxopt.passes` group; a plugin that fails to import is recorded with its error.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points

from onnxopt.errors import UserError
from onnxopt.framework.pass_api import Pass

ENTRY_POINT_GROUP = "onnxopt.passes"

_PASSES: dict[str, type[Pass]] = {}
#: Plugins that failed to load: entry point name -> one-line error.
PLUGIN_ERRORS: dict[str, str] = {}
#: Where each pass came from: "builtin" or the plugin's distribution name.
PASS_ORIGINS: dict[str, str] = {}
_loaded = False
_current_origin = "builtin"


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: make a `Pass` subclass available to pipelines under `name`."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass('{name}') must decorate a subclass of onnxopt.Pass")
        if name in _PASSES and _PASSES[name] is not cls:
            raise ValueError(f"a pass named '{name}' is already registered ({_PASSES[name].__module__})")
        cls.name = name
        _PASSES[name] = cls
        PASS_ORIGINS[name] = _current_origin
        return cls

    return deco


def load_passes() -> None:
    """Import built-in passes and plugins once."""
    global _loaded, _current_origin
    if _loaded:
        return
    _loaded = True
    importlib.import_module("onnxopt.passes")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _current_origin = ep.dist.name if ep.dist else ep.name
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the tool, whatever it raises
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            PLUGIN_ERRORS[ep.name] = f"{ep.value}: {last}"
        finally:
            _current_origin = "builtin"


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under `name`, or a UserError listing the known passes."""
    load_passes()
    if name not in _PASSES:
        hint = f"; plugin errors: {'; '.join(PLUGIN_ERRORS.values())}" if PLUGIN_ERRORS else ""
        raise UserError(f"unknown pass '{name}' (known: {', '.join(sorted(_PASSES))}; see 'onnxopt passes'){hint}")
    return _PASSES[name]


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, sorted."""
    load_passes()
    return dict(sorted(_PASSES.items()))


def pass_origin(cls: type[Pass]) -> str | None:
    """Who wrote a pass: None for onnxopt's own passes, else the plugin's distribution name (for a
    pass that came through an entry point) or its module (a pass registered or built elsewhere)."""
    origin = PASS_ORIGINS.get(cls.name) if _PASSES.get(cls.name) is cls else None
    if origin not in (None, "builtin"):
        return origin
    module = cls.__module__ or ""
    return None if module == "onnxopt" or module.startswith("onnxopt.") else module
