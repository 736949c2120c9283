"""`-v/--verbose` and `-q/--quiet`: how much the command says on stderr.

The command line is the only place that configures logging: library code logs
through `logging.getLogger(__name__)` under the `onnxopt` logger and never sets
levels or handlers. The levels: WARNING by default, INFO with -v, DEBUG with
-vv, ERROR with -q. Command output (reports, tables, JSON) stays on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from onnxopt.ir.gs_compat import route_logging

LOGGER_NAME = "onnxopt"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def add_logging_options(parser: argparse.ArgumentParser, quiet_help: str = "log only errors") -> None:
    """Add -v/--verbose (repeatable) and -q/--quiet to a command's parser.

    `quiet_help` lets a command say what else --quiet silences (optimize: its report).
    Nested subcommands (`ep setup`) get the options too, with no default of their
    own, so `onnxopt ep -v setup X` and `onnxopt ep setup X -v` mean the same.
    """
    _add_to(parser, quiet_help, default_verbose=0, default_quiet=False)
    for sub in _subparsers_of(parser):
        _add_to(sub, quiet_help, default_verbose=argparse.SUPPRESS, default_quiet=argparse.SUPPRESS)


def _add_to(parser: argparse.ArgumentParser, quiet_help: str, default_verbose: object, default_quiet: object) -> None:
    """The two options, mutually exclusive, in their own help group."""
    group = parser.add_argument_group("output").add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default_verbose,
        help="log what the command does on stderr (-v: progress, -vv: debug details)",
    )
    group.add_argument("-q", "--quiet", action="store_true", default=default_quiet, help=quiet_help)


def _subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of a command's own subcommands (argparse keeps them in its subparsers action)."""
    return [
        sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for sub in action.choices.values()
    ]


def log_level(verbose: int, quiet: bool) -> int:
    """The `onnxopt` logger's level for -v count `verbose` and -q."""
    if quiet:
        return logging.ERROR
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is when a record is emitted (so a replaced or
    captured stderr, as under pytest, is honoured and a closed one is never written to)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """Ignored: the stream is always the current `sys.stderr`."""


@contextlib.contextmanager
def logging_configured(verbose: int = 0, quiet: bool = False) -> Iterator[logging.Logger]:
    """Configure the `onnxopt` logger for one command (a one-line format on stderr) and restore its
    level and handlers afterwards, so `main()` can be called repeatedly from Python."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    old_level = logger.level
    logger.setLevel(log_level(verbose, quiet))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def route_gs_logging(quiet: bool) -> None:
    """onnx-graphsurgeon prints its warnings with print(), to stdout: send them to stderr, where they
    cannot mix with reports or JSON, and keep only errors under --quiet (`onnxopt.ir.gs_compat`)."""
    route_logging(quiet)
