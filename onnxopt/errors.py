"""Error types that map to the CLI's exit codes.

`UserError` is a problem with what the user gave us (exit 2, one line, no
traceback); `CheckFailed` means the optimized model does not match (exit 1).
Anything else escaping the tool is an internal error (exit 3).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a path, a file, a pass name, an option, data."""


class CheckFailed(Exception):
    """The optimized model differs from the original beyond the allowed tolerance."""
