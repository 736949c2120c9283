"""`onnxopt passes`: every registered pass (built-in or plugin), what it does and its options."""

from __future__ import annotations

import argparse
import json

from onnxopt.cli.errors import EXIT_OK
from onnxopt.cli.logs import add_logging_options
from onnxopt.framework.pipeline import PRESETS
from onnxopt.framework.registry import PASS_ORIGINS, PLUGIN_ERRORS, all_passes

EPILOG = """\
examples:
  onnxopt passes                      # names, summaries, options with types and defaults
  onnxopt passes --json | jq .fold    # one pass, machine-readable
Use the names and options in a pipeline: -p 'fold,fuse,quantize{method=entropy}'.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `passes`."""
    p = sub.add_parser(
        "passes",
        help="list every pass, what it does and its options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_logging_options(p)
    p.set_defaults(func=run)


def passes_json() -> str:
    """Every pass with its summary, origin and options, plus the plugins that failed to load, as JSON."""
    passes = all_passes()
    return json.dumps(
        {
            name: {
                "summary": cls.summary(),
                "origin": PASS_ORIGINS.get(name),
                "options": {o[0]: {"type": o[1], "default": o[2], "help": o[3]} for o in cls.option_docs()},
            }
            for name, cls in passes.items()
        }
        | {"_plugin_errors": PLUGIN_ERRORS},
        indent=2,
        default=str,
    )


def run(args: argparse.Namespace) -> int:
    """Print the passes (text or JSON), the presets and the plugins that failed to load."""
    if args.json:
        print(passes_json())
        return EXIT_OK
    for name, cls in all_passes().items():
        origin = PASS_ORIGINS.get(name, "builtin")
        print(f"{name}{'' if origin == 'builtin' else f'  (plugin: {origin})'}")
        print(f"    {cls.summary()}")
        for oname, otype, default, helptext in cls.option_docs():
            print(f"    {oname:<16} {otype:<12} default {default!s:<10} {helptext}")
        print()
    print("presets: " + ", ".join(f"{k} = {v}" for k, v in PRESETS.items()))
    for ep, err in PLUGIN_ERRORS.items():
        print(f"plugin '{ep}' failed to load: {err}")
    return EXIT_OK
