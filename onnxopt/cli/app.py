"""The `onnxopt` command: its argument parser and `main`, which dispatches to one module per command.

Exit codes (see `onnxopt.cli.errors`): 0 ok, 1 a check or validation failed,
2 user error (one line, no traceback), 3 internal error (the line names a
saved reproducer), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from typing import NoReturn

from onnxopt import __version__
from onnxopt.cli import cache, demo, diff, ep, inspect_model, optimize, optimize_many, passes, report, validate
from onnxopt.cli.errors import EXIT_OK, EXIT_USER, run_command
from onnxopt.cli.logs import logging_configured, route_gs_logging

DESCRIPTION = """\
onnxopt: make an exported .onnx smaller and faster, and prove what it cost.

Typical use:
  onnxopt optimize model.onnx -o model.opt.onnx                  # fold + fuse (exact)
  onnxopt optimize model.onnx -o q.onnx -p fold,quantize --calib calib_dir/
  onnxopt optimize model.onnx -o p.onnx -p fold,fuse,prune{macs=0.3} --calib calib_dir/ --check 3
  onnxopt validate model.onnx q.onnx --ep cpu,openvino --data calib_dir/
  onnxopt passes                                                  # every pass and its options
  onnxopt demo                                                    # the whole job on PP-OCR's classifier

Pipelines are comma-separated passes with options in braces:
  fold,fuse,prune{macs=0.3,round_to=8},quantize{method=entropy}
Calibration data: a directory of .npz files (one sample each, keys = input names)
or one .npz whose arrays carry a leading sample axis.
Every command takes -v (say what it does on stderr; -vv for debug details) and -q (errors only).
Exit codes: 0 ok, 1 check/validation failed, 2 bad input, 3 internal error.
"""

#: The modules of the commands, in the order `--help` lists them; each has `add_parser(subparsers)`.
COMMANDS = (optimize, inspect_model, passes, demo, optimize_many, validate, diff, report, ep, cache)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"onnxopt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USER)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="onnxopt", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM and SIGHUP end the command like Ctrl-C: no output written, exit 130."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command with onnx-graphsurgeon's chatter routed to stderr."""
    route_gs_logging(args.quiet)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `onnxopt` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error
        return EXIT_USER if exc.code not in (0, None) else EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    with logging_configured(args.verbose, args.quiet):
        return run_command(functools.partial(_run, args), argv)
