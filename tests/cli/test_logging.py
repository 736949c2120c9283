"""-v/-q: the command line configures the `onnxopt` logger (INFO with -v, DEBUG with -vv, ERROR with -q,
WARNING by default), one plain line per record on stderr; library code never configures logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.cli.logs import log_level


def _model() -> onnx.ModelProto:
    """y = x + (a + b): the constant branch folds, so `fold` changes the graph."""
    a = numpy_helper.from_array(np.ones(4, np.float32), "a")
    b = numpy_helper.from_array(np.full(4, 2, np.float32), "b")
    nodes = [
        helper.make_node("Add", ["a", "b"], ["c"], name="ab"),
        helper.make_node("Add", ["x", "c"], ["y"], name="xc"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [a, b],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    return path


def _optimize(model_path, *flags: str) -> list[str]:
    argv = ["optimize", str(model_path), "-o", str(model_path.with_name("o.onnx")), "-p", "fold", *flags]
    assert main(argv) == 0
    return argv


def test_verbose_shows_info_lines_of_the_run(model_path, capsys):
    _optimize(model_path, "-v")
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert any(line.startswith("INFO onnxopt.cli.optimize: optimizing ") and "fold" in line for line in err), err
    assert any(line.startswith("INFO onnxopt.cli.optimize: pass fold: changed in ") for line in err), err
    assert any(line.startswith("INFO onnxopt.cli.optimize: wrote ") for line in err), err
    assert not any(line.startswith("DEBUG") for line in err), err
    assert "INFO" not in captured.out  # log lines never mix with the report on stdout
    assert "wrote" in captured.out


def test_vv_adds_debug_lines(model_path, capsys):
    _optimize(model_path, "-vv")
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("DEBUG onnxopt.cli.optimize: pass fold stats: ") for line in err), err


@pytest.mark.parametrize("flags", [(), ("-q",), ("--quiet",)])
def test_default_and_quiet_hide_info(model_path, capsys, flags):
    _optimize(model_path, *flags)
    captured = capsys.readouterr()
    assert "INFO" not in captured.err, captured.err
    if flags:  # optimize's --quiet keeps its meaning: no report either
        assert captured.out == ""


def test_verbose_and_quiet_together_are_a_user_error(model_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(model_path.with_name("o.onnx")), "-v", "-q"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_every_command_takes_v_and_q():
    for argv in (["passes", "-q"], ["passes", "-vv"], ["ep", "-q", "list"], ["ep", "list", "-v"]):
        assert main(argv) == 0, argv


def test_levels():
    assert log_level(0, False) == logging.WARNING
    assert log_level(1, False) == logging.INFO
    assert log_level(2, False) == logging.DEBUG
    assert log_level(5, False) == logging.DEBUG
    assert log_level(0, True) == logging.ERROR


def test_main_leaves_logging_as_it_found_it(model_path, capsys):
    logger = logging.getLogger("onnxopt")
    handlers, level = list(logger.handlers), logger.level
    _optimize(model_path, "-vv")
    assert logger.handlers == handlers and logger.level == level


def test_the_library_configures_no_logging():
    """Importing onnxopt and every CLI module adds no handler and sets no level on our loggers."""
    code = (
        "import logging, onnxopt, onnxopt.cli.app\n"
        "ours = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.split('.')[0] == 'onnxopt']\n"
        "bad = [(lg.name, lg.handlers, lg.level) for lg in ours + [logging.getLogger('onnxopt')]\n"
        "       if lg.level != logging.NOTSET or any(not isinstance(h, logging.NullHandler) for h in lg.handlers)]\n"
        "assert not bad and not logging.root.handlers, (bad, logging.root.handlers)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_python_m_onnxopt_logs_to_stderr(model_path):
    out = model_path.with_name("o.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", "optimize", str(model_path), "-o", str(out), "-p", "fold", "-v"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"INFO onnxopt.cli.optimize: wrote {out}" in proc.stderr.splitlines()
    assert "INFO" not in proc.stdout
