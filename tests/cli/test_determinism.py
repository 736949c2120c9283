"""Determinism: the same input and options give byte-identical output, in one process and across processes.

Across processes PYTHONHASHSEED differs, so any order taken from a set or dict
of strings would show up as different bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, real_model

from onnxopt.cli import main

MODELS = ("cls", "det", "squeezenet")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", MODELS)
def test_fold_fuse_is_byte_identical_twice_in_process(name, tmp_path):
    src = real_model(name)
    outs = [tmp_path / f"a{i}.onnx" for i in range(2)]
    for o in outs:
        assert main(["optimize", str(src), "-o", str(o), "--quiet"]) == 0
    assert _digest(outs[0]) == _digest(outs[1])


@pytest.mark.parametrize("name", MODELS)
def test_fold_fuse_is_byte_identical_across_processes(name, tmp_path):
    src = real_model(name)
    digests = set()
    for seed in ("1", "2"):
        out = tmp_path / f"p{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed, "ONNXOPT_PROGRESS": "0"}
        p = subprocess.run(
            [sys.executable, "-m", "onnxopt.cli", "optimize", str(src), "-o", str(out), "--quiet"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr
        digests.add(_digest(out))
    assert len(digests) == 1
