"""Bad input catalogue through the CLI: each case exits 2 with one line, no traceback, no output, input intact.

Cases run in-process through `onnxopt.cli.main`; two also run as a subprocess to
prove nothing (no traceback, no warning) reaches stderr besides the one line.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, parse

import onnxopt
from onnxopt.cli import main

MODEL = (
    """
<ir_version: 8, opset_import: ["" : 15]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
    w = Constant <value = float[4, 3, 3, 3] {"""
    + ",".join(["0.1"] * 108)
    + """}> ()
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    y = Relu (c)
}"""
)


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    """A directory holding a valid model `m.onnx` and an `out/` directory for outputs."""
    onnx.save(parse(MODEL), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    return tmp_path


def _snapshot(*dirs: Path) -> dict[str, str]:
    """Every file (recursively, hidden ones too) with a hash of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs
        if d.is_dir()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def assert_user_error(argv: list[str], capsys, *dirs: Path, mentions: str = "") -> str:
    """Run the CLI: exit 2, one stderr line naming the problem, no traceback, no file created or changed."""
    before = _snapshot(*dirs)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr: {err}"
    assert len(lines) == 1, f"expected one stderr line, got: {err}"
    assert "Traceback" not in err and lines[0].startswith("onnxopt: error:"), err
    assert mentions.lower() in lines[0].lower(), lines[0]
    assert _snapshot(*dirs) == before, "files were created, removed or changed"
    return lines[0]


def test_missing_file(work, capsys):
    assert_user_error(
        ["optimize", str(work / "nope.onnx"), "-o", str(work / "out/o.onnx")], capsys, work, mentions="no such file"
    )


def test_directory_as_model(work, capsys):
    assert_user_error(["optimize", str(work / "out"), "-o", str(work / "o.onnx")], capsys, work, mentions="directory")


def test_empty_file(work, capsys):
    (work / "empty.onnx").write_bytes(b"")
    assert_user_error(
        ["optimize", str(work / "empty.onnx"), "-o", str(work / "out/o.onnx")], capsys, work, mentions="empty"
    )


def test_truncated_model(work, capsys):
    data = (work / "m.onnx").read_bytes()
    (work / "t.onnx").write_bytes(data[: len(data) // 2])
    assert_user_error(["optimize", str(work / "t.onnx"), "-o", str(work / "out/o.onnx")], capsys, work)


def test_random_bytes(work, capsys):
    (work / "r.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_user_error(["optimize", str(work / "r.onnx"), "-o", str(work / "out/o.onnx")], capsys, work)


def test_protobuf_that_is_not_a_model(work, capsys):
    t = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "t")
    (work / "tensor.onnx").write_bytes(t.SerializeToString())
    assert_user_error(["optimize", str(work / "tensor.onnx"), "-o", str(work / "out/o.onnx")], capsys, work)


def test_model_failing_the_checker(work, capsys):
    m = parse(MODEL)
    m.graph.node[2].input[0] = "undefined_tensor"
    onnx.save(m, str(work / "bad.onnx"))
    assert_user_error(
        ["optimize", str(work / "bad.onnx"), "-o", str(work / "out/o.onnx")],
        capsys,
        work,
        mentions="not a valid onnx model",
    )


def test_missing_external_data_file(work, capsys):
    m = onnxopt.optimize(parse(MODEL), pipeline="fold").model  # the Constant weight becomes an initializer
    onnx.save(m, str(work / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (work / "ext.onnx.data").exists()
    (work / "ext.onnx.data").unlink()
    assert_user_error(
        ["optimize", str(work / "ext.onnx"), "-o", str(work / "out/o.onnx")], capsys, work, mentions="external data"
    )


def _calib(d: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    d.mkdir()
    for i, s in enumerate(samples):
        np.savez(d / f"{i:03d}.npz", **s)
    return d


def _good(n=1, shape=(1, 3, 8, 8)):
    return np.random.default_rng(n).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("pipeline,extra", [("fold,quantize", []), ("fold", ["--check", "2"])])
@pytest.mark.parametrize(
    "case,samples,mentions",
    [
        ("names", [{"input": _good()}], "input names"),
        ("shape", [{"x": _good(shape=(1, 3, 8))}], "shape"),
        ("channels", [{"x": _good(shape=(1, 4, 8, 8))}], "shape"),
        ("dtype", [{"x": np.ones((1, 3, 8, 8), np.int32)}], "dtype"),
        ("nan", [{"x": np.full((1, 3, 8, 8), np.nan, np.float32)}], "nan"),
        (
            "nan_later",
            [{"x": _good(1)}, {"x": _good(2)}, {"x": np.where(_good(3) > 0, np.inf, 0).astype(np.float32)}],
            "nan",
        ),
    ],
)
def test_bad_calibration_data(work, capsys, pipeline, extra, case, samples, mentions):
    calib = _calib(work / f"calib_{case}", samples)
    if case == "nan_later" and "--check" in extra:
        extra = ["--check", "3"]
    assert_user_error(
        [
            "optimize",
            str(work / "m.onnx"),
            "-o",
            str(work / "out/o.onnx"),
            "-p",
            pipeline,
            "--calib",
            str(calib),
            *extra,
        ],
        capsys,
        work,
        mentions=mentions,
    )


def test_calibration_path_missing(work, capsys):
    assert_user_error(
        [
            "optimize",
            str(work / "m.onnx"),
            "-o",
            str(work / "out/o.onnx"),
            "-p",
            "fold,quantize",
            "--calib",
            str(work / "nocalib"),
        ],
        capsys,
        work,
        mentions="calibration",
    )


@pytest.mark.parametrize(
    "pipeline,mentions",
    [
        ("fold,nosuchpass", "nosuchpass"),
        ("fold{nosuch=1}", "nosuch"),
        ("fold{size_limit_mb=abc}", "size_limit_mb"),
        ("fold{shapes=maybe}", "shapes"),
        ("fold{max_iterations=2.5}", "max_iterations"),
        ("fold,,fuse", ""),
        ("fold{", ""),
    ],
)
def test_bad_pipeline(work, capsys, pipeline, mentions):
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "out/o.onnx"), "-p", pipeline],
        capsys,
        work,
        mentions=mentions,
    )


def test_unknown_cli_option_and_bad_option_type(work, capsys):
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "out/o.onnx"), "--no-such-flag"], capsys, work
    )
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "out/o.onnx"), "--check", "many"], capsys, work
    )


def test_output_directory_missing(work, capsys):
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "nodir/sub/o.onnx")],
        capsys,
        work,
        mentions="does not exist",
    )


def test_output_directory_is_a_file(work, capsys):
    """A regular file used as a directory: the one 'read-only parent' that even root cannot write into."""
    (work / "afile").write_text("x")
    assert_user_error(["optimize", str(work / "m.onnx"), "-o", str(work / "afile/o.onnx")], capsys, work)


def test_output_directory_read_only(work, capsys):
    """A read-only directory. Root ignores permission bits, so as root use /proc (no new files, even for root)."""
    import os

    if os.geteuid() == 0:
        target = Path("/proc/onnxopt-test.onnx")
        assert_user_error(["optimize", str(work / "m.onnx"), "-o", str(target)], capsys, work, mentions="writable")
        assert not target.exists()
        return
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_user_error(
            ["optimize", str(work / "m.onnx"), "-o", str(ro / "o.onnx")], capsys, work, mentions="writable"
        )
    finally:
        ro.chmod(0o700)


def test_output_is_a_directory(work, capsys):
    assert_user_error(["optimize", str(work / "m.onnx"), "-o", str(work / "out")], capsys, work, mentions="directory")


def test_output_equals_input(work, capsys):
    assert_user_error(["optimize", str(work / "m.onnx"), "-o", str(work / "m.onnx")], capsys, work, mentions="input")
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "out/../m.onnx")], capsys, work, mentions="input"
    )


def test_report_path_equal_to_input(work, capsys):
    assert_user_error(
        ["optimize", str(work / "m.onnx"), "-o", str(work / "out/o.onnx"), "--report", str(work / "m.onnx")],
        capsys,
        work,
        mentions="input",
    )


@pytest.mark.parametrize("case", ["random", "nan"])
def test_subprocess_prints_one_line_and_no_traceback(work, case):
    if case == "random":
        (work / "r.onnx").write_bytes(b"\x08\x01garbage" * 100)
        argv = ["optimize", str(work / "r.onnx"), "-o", str(work / "out/o.onnx")]
    else:
        calib = _calib(work / "calib", [{"x": np.full((1, 3, 8, 8), np.nan, np.float32)}])
        argv = [
            "optimize",
            str(work / "m.onnx"),
            "-o",
            str(work / "out/o.onnx"),
            "-p",
            "fold,quantize",
            "--calib",
            str(calib),
        ]
    before = _snapshot(work)
    p = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**__import__("os").environ, "ONNXOPT_PROGRESS": "0"},
    )
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert _snapshot(work) == before


@pytest.mark.parametrize(
    "content,mentions", [(b"", "empty file"), (b"not a zip archive", "not a .npz archive"), (None, "holds no arrays")]
)
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_empty_or_non_zip_npz(work, capsys, content, mentions, layout):
    """An empty, non-zip or array-less .npz, alone or in a calibration directory: one line, exit 2."""
    target = work / "calib.npz" if layout == "file" else work / "calib" / "000.npz"
    target.parent.mkdir(exist_ok=True)
    if content is None:
        np.savez(target)
    else:
        target.write_bytes(content)
    assert_user_error(
        [
            "optimize",
            str(work / "m.onnx"),
            "-o",
            str(work / "out/o.onnx"),
            "-p",
            "fold,quantize",
            "--calib",
            str(target if layout == "file" else target.parent),
        ],
        capsys,
        work,
        mentions=mentions,
    )
