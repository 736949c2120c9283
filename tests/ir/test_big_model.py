"""Generated models over 2 GB (weights in an external data file) through `fold,fuse` and `fold,quantize`.

Correctness only: the result saves (with external data where weights stay
float), loads, passes the checker and gives the original's outputs (or close
to them, for quantize). Peak memory is measured by
`bench/big_model.py` (bench/results/big_model.md). The model is written to
/dev/shm when it has room (the disk write dominates otherwise) and the test
skips when the machine lacks the memory to hold it a few times over.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from conftest import ROOT

from bench.big_model import SHAPES, K, make_big_model, model_bytes, outputs

pytestmark = pytest.mark.slow
NEEDED = 14 * 2**30  # input + output in tmpfs, the optimizer's peak and two onnxruntime sessions, with slack


@pytest.fixture
def big_dir():
    if psutil.virtual_memory().available < NEEDED:
        pytest.skip(f"needs {NEEDED / 2**30:.0f} GiB of free memory for a 2.2 GB model")
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 6 * 2**30 else None
    d = Path(tempfile.mkdtemp(prefix="onnxopt-big-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_fold_fuse_on_a_model_over_2gb_saves_with_external_data(big_dir):
    src = make_big_model(big_dir)
    assert model_bytes(src) > 2**31
    out = big_dir / "out.onnx"
    p = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "optimize", str(src), "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert (big_dir / "out.onnx.data").exists() and out.stat().st_size < 2**20
    onnx.checker.check_model(str(out))
    meta = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in meta.graph.node] == ["Gemm", "Relu", "Gemm"]  # Mul fused, MatMul+Add -> Gemm
    x = np.random.default_rng(1).standard_normal((2, K), dtype=np.float32)
    ref = outputs(src, x)
    got = outputs(out, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_quantize_on_a_model_over_2gb_saves_and_stays_close(big_dir):
    k, m = SHAPES[8]
    src = make_big_model(big_dir, k, m, layers=8)
    assert model_bytes(src) > 2**31
    calib = big_dir / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(calib / f"{i}.npz", x=rng.standard_normal((1, k), dtype=np.float32))
    out, report = big_dir / "q.onnx", big_dir / "q.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxopt.cli",
            "optimize",
            str(src),
            "-o",
            str(out),
            "-p",
            "fold,quantize",
            "--calib",
            str(calib),
            "--report",
            str(report),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr
    import json

    stats = json.loads(report.read_text())["passes"][-1]["stats"]
    assert stats["int8_layers"] + stats["int8_stored_layers"] > 0, stats  # it quantized, not left float
    assert model_bytes(out) < model_bytes(src)
    onnx.checker.check_model(str(out))
    x = rng.standard_normal((2, k), dtype=np.float32)
    ref, got = outputs(src, x), outputs(out, x)
    assert 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()) > 20
