"""Where onnxopt keeps files between runs.

`$ONNXOPT_HOME` (default `~/.cache/onnxopt`): managed EP environments, crash
reproducers. `$ONNXOPT_CACHE` (default: the home directory): calibration
statistics and timing caches, which make latency-aware decisions reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The tool's directory: `$ONNXOPT_HOME` or `~/.cache/onnxopt`."""
    return Path(os.environ.get("ONNXOPT_HOME") or Path.home() / ".cache" / "onnxopt")


def cache_dir() -> Path:
    """Statistics and timing caches: `$ONNXOPT_CACHE`, else `home()`."""
    return Path(os.environ.get("ONNXOPT_CACHE") or home())
