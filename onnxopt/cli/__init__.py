"""The `onnxopt` command line: one module per command, `app` for the parser and `main`."""

from __future__ import annotations

from onnxopt.cli.app import main

__all__ = ["main"]
