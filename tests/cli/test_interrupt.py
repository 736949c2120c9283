"""Interruption: SIGINT or SIGTERM during a long calibration leaves no partial output and exits non-zero.

`optimize --check 200 --calib DIR` on PP-OCR rec reads and runs 200 samples (tens
of seconds); the signal arrives once the run is under way (its first samples
are being evaluated). The CLI maps both signals to KeyboardInterrupt and exit 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, real_model


@pytest.fixture(scope="module")
def rec_calib(tmp_path_factory) -> Path:
    import onnx

    from onnxopt.data.samples import seeded_inputs

    src = real_model("rec")
    d = tmp_path_factory.mktemp("rec_calib")
    model = onnx.load(str(src), load_external_data=False)
    for i, s in enumerate(seeded_inputs(model, 200, seed=0, input_shapes={"x": (1, 3, 48, 320)})):
        np.savez(d / f"{i:03d}.npz", **s)
    return d


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_calibration_leaves_no_output(sig, rec_calib, tmp_path):
    src = real_model("rec")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = src.read_bytes()
    cmd = [
        sys.executable,
        "-m",
        "onnxopt.cli",
        "optimize",
        str(src),
        "-o",
        str(out_dir / "rec.opt.onnx"),
        "--check",
        "200",
        "--calib",
        str(rec_calib),
        "--report",
        str(out_dir / "report.json"),
    ]
    child = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ONNXOPT_PROGRESS": "0"},
    )
    time.sleep(12)  # import, load, fold, fuse: the check over 200 samples is running by now
    assert child.poll() is None, f"finished before the signal: {child.communicate()}"
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err, err
    assert list(out_dir.iterdir()) == [], "partial output left behind"
    assert src.read_bytes() == before
