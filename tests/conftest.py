"""Shared test helpers: real-model fixtures, parsing small models, running them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.data import wheel_models

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".fixtures" / "models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so tests can import `fixtures.*`

os.environ.setdefault("ONNXOPT_PROGRESS", "0")

PPOCR = ("det", "rec", "cls")
LIGHT = tuple(wheel_models.LIGHT)  # the light_* models inside the onnx wheel


def real_model(name: str) -> Path:
    """Path of a fetched real model; skip the test (naming the fetch script) when it is missing."""
    path = MODELS / (f"{name}.onnx" if name in PPOCR else f"light_{name}.onnx")
    if not path.exists():
        pytest.skip(f"{path} missing: run `python fixtures/fetch_models.py`")
    return path


def parse(text: str) -> onnx.ModelProto:
    """A model from ONNX text, checked."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_model(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a model on the CPU EP with graph optimizations off (computes what the graph says)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the main graph, in order."""
    return [n.op_type for n in model.graph.node]
