"""Saving models: output path checks and atomic writes.

Saving goes to a temporary name in the destination directory and is renamed into
place, so a failure never leaves a half-written model and the input is never touched.
Models over 2 GB, or whose weights are staged on disk, are written with external data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxopt.errors import UserError
from onnxopt.ir import weights
from onnxopt.ir.external_data import TWO_GB, model_files, model_nbytes, write_external

#: Errors of a full disk or quota: the user's to fix, not an internal error.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def data_file_of(out: str | os.PathLike) -> Path:
    """Where `save_model` puts the external data of a model saved at `out`: `<name>.data` beside the
    file `out` resolves to (a symlinked output is written at its target, model and data together)."""
    target = Path(out).resolve()
    return target.parent / (target.name + ".data")


def check_data_beside(out: str | os.PathLike) -> None:
    """Refuse a symlinked output whose target lies in another directory when external data is written:
    readers (onnx, onnxruntime) look for the data file beside the path they are given, the link, while
    it must sit beside the model file, at the target."""
    o = Path(out)
    if o.is_symlink() and o.resolve().parent != o.absolute().parent.resolve():
        raise UserError(
            f"{o}: is a symbolic link to {o.resolve()} in another directory; with external data the "
            "model and its data file must sit together: give the link's target as the output"
        )


def check_output_path(
    out: str | os.PathLike,
    inputs: tuple[str | os.PathLike, ...] = (),
    protected: set[Path] | frozenset[Path] = frozenset(),
) -> Path:
    """Validate an output path before any work is done, so errors come first and cheaply.

    Neither the output nor its possible external data file (`data_file_of`) may be one
    of the `inputs` or of their external data files, or a `protected` path.
    """
    o = Path(out)
    _check_not_guarded(o, _guarded_files(inputs, protected))
    parent = o.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{o}: output directory {parent} does not exist")
    if o.is_dir():
        raise UserError(f"{o}: is a directory; give a file name for the output model")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts): try it
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UserError(f"{o}: output directory {parent} is not writable ({exc.strerror or exc})") from None
    return o


def _guarded_files(inputs: tuple[str | os.PathLike, ...], protected: set[Path] | frozenset[Path]) -> dict[Path, str]:
    """The files an output must not overwrite, each with the words that say what it is."""
    guarded: dict[Path, str] = {q: "a file the tool must not overwrite" for q in protected}
    for i in inputs:
        for f in model_files(i):
            guarded[f] = f"the input {i}" if f == Path(i).resolve() else f"an external data file of the input {i}"
    return guarded


def _check_not_guarded(o: Path, guarded: dict[Path, str]) -> None:
    """Refuse an output (or its external data file) that is one of the `guarded` files."""
    target = o.resolve()
    if target in guarded:
        raise UserError(f"{o}: output path is {guarded[target]}; inputs are never overwritten, choose another path")
    data = data_file_of(o)
    if data in guarded:
        raise UserError(
            f"{o}: its external data file {data.name} would overwrite {guarded[data]}; choose another output path"
        )


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    external_data: bool | None = None,
    protected: set[Path] | frozenset[Path] = frozenset(),
) -> Path:
    """Write `model` atomically; external data when asked, when the model exceeds 2 GB, or when its
    weights are staged on disk (big models, `onnxopt.ir.weights`).

    The external data file is named `<model file name>.data` beside the model. A
    symlinked `path` is written at its target, so model and data land together and
    the rename never crosses devices. Neither file may be one of the `protected`
    paths (the input model and its data). A full disk is a `UserError`; nothing is
    left half-written and no temporary directory remains.
    """
    out = check_output_path(path, protected=protected)
    target = out.resolve()
    if weights.has_external(model):  # staged weights (onnxopt.ir.weights) go file to file, never back into memory
        external_data = True
    elif external_data is None:
        external_data = model_nbytes(model) >= TWO_GB - 2**26
    if external_data:
        check_data_beside(out)
    parent = target.parent
    tmpdir: Path | None = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=parent))
        _write_and_replace(model, target, tmpdir, external_data)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise UserError(
                f"{out}: cannot write the model: {exc.strerror or 'no space left'} in {parent}; "
                "nothing was written (free some space or choose another -o)"
            ) from None
        raise
    finally:
        if tmpdir is not None:
            with _signals_deferred():
                shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _write_and_replace(model: onnx.ModelProto, target: Path, tmpdir: Path, external_data: bool) -> None:
    """Write the model (and its data file) in `tmpdir`, then rename them over `target` as a pair."""
    data_name = target.name + ".data"
    tmp_model = tmpdir / target.name
    if external_data:
        write_external(model, tmp_model, tmpdir / data_name, data_name)
    else:
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    with _signals_deferred():  # model and data are replaced as a pair, never one without the other
        if external_data:
            os.replace(tmpdir / data_name, target.parent / data_name)
        os.replace(tmp_model, target)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for the duration (main thread only), so cleanup is not cut short; a
    signal that arrived meanwhile is raised again right after, to its own handler. (Python-level
    handlers, not a signal mask: onnxruntime's threads would take a masked process signal.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old = signal.getsignal(sig)
        if old is not None:  # None: a handler installed outside Python, left alone
            held[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, old in held.items():
            signal.signal(sig, old)
        for signum in pending:
            signal.raise_signal(signum)
