"""Errors raised inside a plugin's pass are the plugin's: name the plugin, its module and the pass.

Without this, an exception escaping a third-party pass reaches the command line as
"onnxopt: internal error" and users report it to the wrong project. The manager
runs third-party passes through `run_attributed`, which re-raises anything but a
`UserError`/`CheckFailed` (which a plugin may raise on purpose) as a `PluginPassError`
naming who wrote the pass and where in its code it failed; the original exception
is kept as `__cause__` for its traceback.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import onnx_graphsurgeon as gs

from onnxopt.errors import CheckFailed, UserError
from onnxopt.framework.context import PassContext
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import pass_origin


class PluginPassError(Exception):
    """A third-party pass raised: a bug, but not onnxopt's. One line naming the plugin, module, pass
    and the failing line of the plugin's code; the fix is the plugin's (or leaving the pass out).
    The command line exits 3 (a software fault, as for our own bugs) with a reproducer, and says
    whose it is."""

    def __init__(self, message: str, pass_name: str, origin: str, module: str):
        super().__init__(message)
        self.pass_name = pass_name
        self.origin = origin
        self.module = module


def _package_root(module: str) -> Path | None:
    """The directory (or file) of the top-level package of `module`, to find its frames."""
    top = sys.modules.get(module.split(".")[0])
    file = getattr(top, "__file__", None)
    if not file:
        return None
    return Path(file).parent if hasattr(top, "__path__") else Path(file)


def _plugin_frame(exc: BaseException, module: str) -> str:
    """'file.py:LINE in func' of the innermost traceback frame inside the plugin's code, or ''."""
    root = _package_root(module)
    if root is None:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).is_relative_to(root)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def plugin_error(p: Pass, exc: Exception, origin: str) -> PluginPassError:
    """The attributed error for `exc` raised by third-party pass `p` (from `origin`)."""
    module = type(p).__module__
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    where = _plugin_frame(exc, module)
    source = f"plugin '{origin}'" if origin != module else "a pass outside onnxopt"
    return PluginPassError(
        f"pass '{p.name}' of {source} (module {module}{', ' + where if where else ''}) failed: {last[:300]}; "
        "this is an error in the plugin, not in onnxopt: report it to the plugin's authors or leave the pass "
        "out of the pipeline",
        p.name,
        origin,
        module,
    )


def run_attributed(p: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """Run `p` and check it returned a `PassResult`. An exception from a third-party pass (a wrong
    result type included) becomes a `PluginPassError` naming the plugin; onnxopt's own passes'
    errors pass through as they are (they are ours)."""
    try:
        result = p.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{p.name}' returned {type(result).__name__}, expected PassResult")
    except (UserError, CheckFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - the plugin boundary: whatever a plugin raises is attributed to it
        origin = pass_origin(type(p))
        if origin is None:
            raise
        raise plugin_error(p, exc, origin) from exc
    return result
