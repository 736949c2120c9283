"""Exit codes of the `onnxopt` command and how an exception becomes one.

0 ok, 1 a check or validation failed, 2 user error (one line, no traceback),
3 internal error (the line names a saved reproducer), 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from onnxopt.errors import CheckFailed, UserError
from onnxopt.framework.attribution import PluginPassError
from onnxopt.ir.model_io import fits_in_protobuf, save_model
from onnxopt.paths import home
from onnxopt.verify.gate import GateFailed

EXIT_OK, EXIT_CHECK, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED = 130


def save_reproducer(argv: list[str], exc: BaseException) -> Path:
    """Write the command line, traceback and input model of a crash into a new directory of its own
    (timestamped, never shared with another crash of the same second); a model the save gate
    rejected (`GateFailed`) is saved there too, as `rejected.onnx`."""
    root = home() / "crashes"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    (d / "command.json").write_text(json.dumps({"argv": argv, "cwd": os.getcwd()}, indent=2))
    (d / "traceback.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for a in argv:
        if a.endswith(".onnx") and Path(a).is_file() and Path(a).stat().st_size < 2**31:
            shutil.copyfile(a, d / Path(a).name)
            break
    rejected = getattr(exc, "model", None)
    if rejected is not None and fits_in_protobuf(rejected):
        try:
            save_model(rejected, d / "rejected.onnx")
        except Exception:  # noqa: BLE001  the reproducer is best effort; the error line matters more
            pass
    return d


def run_command(command: Callable[[], int], argv: list[str]) -> int:
    """Run a command and turn what escapes it into an exit code and one line on stderr."""
    try:
        return command()
    except UserError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except CheckFailed as exc:
        print(f"onnxopt: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK
    except BrokenPipeError:  # `onnxopt passes | head`: the reader left, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except PluginPassError as exc:
        where = save_reproducer(argv, exc)
        print(
            f"onnxopt: plugin error: {exc} (reproducer saved in {where}; report it to the plugin's authors, "
            "or leave the pass out of the pipeline)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    except KeyboardInterrupt as exc:
        print(f"onnxopt: interrupted ({exc or 'SIGINT'}); no output written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001  the contract is: never a bare traceback
        return unexpected_error(argv, exc)


def unexpected_error(argv: list[str], exc: Exception) -> int:
    """A full disk is the user's to fix (exit 2); anything else is a bug of ours: save a reproducer
    and say where (exit 3)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        print(
            f"onnxopt: error: {exc.strerror} writing {exc.filename or 'a file'}; free some space or write elsewhere",
            file=sys.stderr,
        )
        return EXIT_USER
    where = save_reproducer(argv, exc)
    if isinstance(exc, GateFailed):  # the save gate refused the model: a bug of ours, nothing written
        print(
            f"onnxopt: internal error: {str(exc)[:400]}; nothing written (reproducer with the rejected "
            f"model saved in {where}; please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    print(f"onnxopt: internal error: {last[:300]} (reproducer saved in {where}; please report it)", file=sys.stderr)
    return EXIT_INTERNAL
