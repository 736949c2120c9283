"""`onnxopt cache list|clear`: the files onnxopt keeps between runs, their sizes, and removing them.

Kinds: `timing` (latency measurements and decisions, per onnxruntime version and CPU) and
`calibration` (activation statistics) under `$ONNXOPT_CACHE`; `crashes` (reproducers) and
`envs` (the managed OpenVINO/CUDA environments) under `$ONNXOPT_HOME`. `clear` without a kind
removes the two that are rebuilt on their own (timing, calibration); crashes and envs go only
when named, since an environment takes a download to set up again.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from onnxopt.cli.logs import add_logging_options
from onnxopt.errors import UserError
from onnxopt.paths import cache_dir, home

EPILOG = """\
examples:
  onnxopt cache list                  # each kind of cache: where, how many entries, how big
  onnxopt cache clear                 # timing and calibration caches (rebuilt when needed)
  onnxopt cache clear timing          # only the latency timings and decisions
  onnxopt cache clear envs            # the managed EP environments (set up again with onnxopt ep setup)
"""

#: kind -> (what it holds, a function listing its entries)
KINDS: dict[str, tuple[str, Callable[[], list[Path]]]] = {
    "timing": ("latency timings and decisions", lambda: sorted(cache_dir().glob("timing-*.json"))),
    "calibration": ("calibration statistics", lambda: sorted(cache_dir().glob("calib-*.json"))),
    "crashes": ("crash reproducers", lambda: _children(home() / "crashes")),
    "envs": ("managed EP environments", lambda: _children(home() / "envs")),
}
#: The kinds `clear` removes when none is named.
REBUILT = ("timing", "calibration")


def _children(d: Path) -> list[Path]:
    """The entries of directory `d`, none when it does not exist."""
    return sorted(d.iterdir()) if d.is_dir() else []


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(n: float) -> str:
    """Bytes in B/KiB/MiB/GiB, one decimal."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def run_cache_command(args: argparse.Namespace) -> int:
    """Run `onnxopt cache list|clear`; returns the exit code."""
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown cache kind {', '.join(unknown)} (kinds: {', '.join(KINDS)})")
    kinds = args.kinds or (list(KINDS) if args.cache_command == "list" else list(REBUILT))
    for kind in kinds:
        what, entries = KINDS[kind]
        found = entries()
        total = sum(size_of(p) for p in found)
        if args.cache_command == "list":
            where = sorted({str(p.parent) for p in found}) or ["-"]
            print(f"{kind:12s} {len(found):5d} entries {human(total):>10s}  {what} ({', '.join(where)})")
            if args.verbose:
                for p in found:
                    print(f"  {human(size_of(p)):>10s}  {p}")
        else:
            for p in found:
                _remove(p)
            print(f"{kind}: removed {len(found)} entries, {human(total)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `cache` and its subcommands."""
    c = sub.add_parser(
        "cache",
        help="list / clear the on-disk caches (timings, calibration, crash reproducers, EP environments)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    c.add_argument("cache_command", choices=("list", "clear"), help="list the caches, or remove them")
    c.add_argument(
        "kinds",
        nargs="*",
        metavar="KIND",
        help=f"only these kinds ({', '.join(KINDS)}); clear without one removes {' and '.join(REBUILT)}",
    )
    add_logging_options(c)
    c.set_defaults(func=run_cache_command)
