"""Progress bars for long work (calibration, validation), quiet when not on a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap `iterable` in a tqdm bar on stderr; disabled when stderr is not a TTY or ONNXOPT_PROGRESS=0."""
    env = os.environ.get("ONNXOPT_PROGRESS")
    disable = env == "0" or (env != "1" and not sys.stderr.isatty())
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            unit=unit,
            disable=disable,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
        )
    )
