"""File safety: the input (model and external data) is never overwritten, reports never replace models,
symlinked outputs keep model and data together, a full disk is a user error, an interrupted save leaves
nothing behind, and optimize-many jobs never write over each other's files."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.ir import external_data, save


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _digest(d: Path) -> dict[str, str]:
    """Every file under `d` (hidden ones too) with a hash of its bytes; links by their target."""
    return {
        str(p.relative_to(d)): (os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(d.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@pytest.fixture()
def ext(tmp_path: Path) -> Path:
    """`m.onnx` whose weights live in `o.onnx.data`: the name an output `o.onnx` would give its data file."""
    onnx.save(_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="o.onnx.data", size_threshold=0)
    return tmp_path


def _user_error(argv: list[str], capsys, d: Path, mentions: str) -> None:
    before = _digest(d)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxopt: error:") and mentions in err[0], err
    assert _digest(d) == before, "files were created, removed or changed"


def test_output_data_file_never_the_inputs_data_file(ext, capsys):
    _user_error(
        ["optimize", str(ext / "m.onnx"), "-o", str(ext / "o.onnx"), "--external-data"],
        capsys,
        ext,
        "would overwrite an external data file of the input",
    )


def test_output_never_the_inputs_data_file(ext, capsys):
    _user_error(
        ["optimize", str(ext / "m.onnx"), "-o", str(ext / "o.onnx.data")],
        capsys,
        ext,
        "external data file of the input",
    )


@pytest.mark.parametrize(
    "report,mentions",
    [
        ("out.onnx", "is the output model"),
        ("m.onnx", "is the input"),
        ("o.onnx.data", "external data file of the input"),
    ],
)
def test_report_never_replaces_a_model(ext, capsys, report, mentions):
    _user_error(
        ["optimize", str(ext / "m.onnx"), "-o", str(ext / "out.onnx"), "--report", str(ext / report)],
        capsys,
        ext,
        mentions,
    )


def test_symlinked_output_is_written_at_its_target(tmp_path, capsys):
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "models").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "models" / "real.onnx")
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(link), "--quiet"]) == 0
    assert link.is_symlink() and (tmp_path / "models" / "real.onnx").is_file()
    assert len(onnx.load(str(link)).graph.initializer) == 1
    # with external data the data file would sit beside the target while readers look beside the link
    _user_error(
        ["optimize", str(tmp_path / "m.onnx"), "-o", str(link), "--external-data"], capsys, tmp_path, "symbolic link"
    )


def test_symlinked_output_in_the_same_directory_takes_external_data(tmp_path):
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    link = tmp_path / "link.onnx"
    link.symlink_to("real.onnx")
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(link), "--external-data", "--quiet"]) == 0
    assert (tmp_path / "real.onnx.data").stat().st_size == 64 * 64 * 4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(link), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 64), np.float32)})[0].shape == (1, 64)


def test_cross_device_symlinked_output(tmp_path):
    """A link on one filesystem to a file on another: the temporary file is made beside the target, so the
    rename never crosses devices (EXDEV)."""
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev or not os.access(other, os.W_OK):
        pytest.skip("no second writable filesystem (/dev/shm) here")
    target_dir = Path(os.path.realpath(other)) / f"onnxopt-test-{os.getpid()}-{tmp_path.name}"
    target_dir.mkdir()
    try:
        onnx.save(_model(), str(tmp_path / "m.onnx"))
        link = tmp_path / "link.onnx"
        link.symlink_to(target_dir / "real.onnx")
        assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(link), "--quiet"]) == 0
        assert len(onnx.load(str(link)).graph.initializer) == 1
        assert [p.name for p in target_dir.iterdir()] == ["real.onnx"]
    finally:
        for p in target_dir.iterdir():
            p.unlink()
        target_dir.rmdir()


class _FullDisk:
    """`open` for the modules writing models (save, external_data) whose files raise ENOSPC once a few
    bytes are written (a disk filling up)."""

    def __init__(self):
        self.real = open

    def __call__(self, path, mode="r", *a, **k):
        f = self.real(path, mode, *a, **k)
        if "w" not in mode:
            return f
        real_write = f.write

        def write(data):
            real_write(data[:16])
            raise OSError(errno.ENOSPC, "No space left on device")

        f.write = write
        return f


@pytest.mark.parametrize("extra", [[], ["--external-data"]])
def test_full_disk_is_one_line_exit_2_and_nothing_half_written(tmp_path, capsys, monkeypatch, extra):
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    for writer in (save, external_data):
        monkeypatch.setattr(writer, "open", _FullDisk(), raising=False)
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out" / "o.onnx"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was written" in err[0], err
    assert "internal error" not in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_save_leaves_no_temporary_directory(tmp_path, capsys, monkeypatch):
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()

    def interrupted(*a, **k):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(save.os, "replace", interrupted)
    assert (
        main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out" / "o.onnx"), "--external-data"]) == 130
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_signal_during_cleanup_does_not_cut_it_short(tmp_path, monkeypatch):
    """SIGTERM arriving while the temporary directory is removed waits until it is gone."""
    onnx.save(_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    real = save.shutil.rmtree

    def rmtree_then_signal(path, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        real(path, *a, **k)

    monkeypatch.setattr(save.shutil, "rmtree", rmtree_then_signal)
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out" / "o.onnx")]) == 130
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".onnxopt-")]


def _fleet(tmp_path: Path, entries: str) -> Path:
    onnx.save(_model(), str(tmp_path / "a.onnx"))
    onnx.save(
        _model(), str(tmp_path / "b.onnx"), save_as_external_data=True, location="shared.onnx.data", size_threshold=0
    )
    (tmp_path / "fleet.toml").write_text(entries)
    return tmp_path / "fleet.toml"


@pytest.mark.parametrize(
    "entries,mentions",
    [
        (
            '[[model]]\ninput = "a.onnx"\noutput = "b.onnx"\n[[model]]\ninput = "b.onnx"\noutput = "b2.onnx"\n',
            "is an input file of 'b'",
        ),
        (
            '[[model]]\ninput = "a.onnx"\noutput = "shared.onnx"\n[[model]]\ninput = "b.onnx"\noutput = "b2.onnx"\n',
            "external data file",
        ),
        (
            '[[model]]\ninput = "a.onnx"\noutput = "x.onnx.data"\n[[model]]\ninput = "b.onnx"\noutput = "x.onnx"\n',
            "is the output of 'a'",
        ),
    ],
)
def test_optimize_many_jobs_never_overwrite_each_other(tmp_path, capsys, entries, mentions):
    manifest = _fleet(tmp_path, entries)
    _user_error(["optimize-many", str(manifest)], capsys, tmp_path, mentions)


def test_optimize_many_report_never_a_model(tmp_path, capsys):
    manifest = _fleet(tmp_path, '[[model]]\ninput = "a.onnx"\noutput = "a2.onnx"\n')
    for report in ("a2.onnx", "a.onnx"):
        _user_error(["optimize-many", str(manifest), "--report", str(tmp_path / report)], capsys, tmp_path, "")


def test_full_disk_while_writing_the_report_is_a_user_error(tmp_path, capsys, monkeypatch):
    import onnxopt.report.json_report

    def full(report, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    onnx.save(_model(), str(tmp_path / "m.onnx"))
    monkeypatch.setattr(onnxopt.report.json_report, "write_json", full)
    assert (
        main(
            ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device writing" in err[0] and "internal error" not in err[0], err
