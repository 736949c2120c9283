"""Pipeline text: `fold,fuse,prune{macs=0.3,multiple=8},quantize{method=entropy}`.

Named pipelines (e.g. `simplify` = `fold,fuse`) expand before parsing.
"""

from __future__ import annotations

import re

from onnxopt.errors import UserError
from onnxopt.framework.pass_api import Pass
from onnxopt.framework.registry import get_pass

#: Named pipelines users can write instead of a list of passes.
PRESETS: dict[str, str] = {
    "simplify": "fold,fuse",
    "default": "fold,fuse",
}

DEFAULT_PIPELINE = "fold,fuse"

_ITEM = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split pipeline text into (pass name, raw options) pairs; presets are expanded."""
    text = (text or "").strip()
    if not text:
        raise UserError("empty pipeline: give passes like 'fold,fuse' (see 'onnxopt passes')")
    items: list[tuple[str, dict[str, str]]] = []
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise UserError(
                f"cannot parse pipeline at '{text[pos : pos + 30]}': expected name or name{{key=value,...}}"
            )
        name, body = m.group(1), m.group(2)
        pos = m.end()
        if name in PRESETS and body is None:
            items.extend(parse_pipeline(PRESETS[name]))
            continue
        opts: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in (body or "").split(","))):
            if "=" not in part:
                raise UserError(f"pass '{name}': option '{part}' needs a value (write key=value)")
            k, v = (s.strip() for s in part.split("=", 1))
            if k in opts:
                raise UserError(f"pass '{name}': option '{k}' given twice ({k}={opts[k]} and {k}={v}); give it once")
            opts[k] = v
        items.append((name, opts))
    return items


def build_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into configured pass instances (all errors are UserErrors).

    Every pass name is resolved and every option of every pass converted and checked
    (ranges, `choices`, `Literal[...]` and `Enum` values, regular expressions) before
    any pass is built, so a mistake anywhere in the text stops the run before any pass runs.
    """
    classes = [(get_pass(name), raw) for name, raw in parse_pipeline(text)]
    configured = [(cls, cls.parse_options(raw)) for cls, raw in classes]
    return [cls(options) for cls, options in configured]
