"""The EP worker, its runner and the interpreter resolution: outputs, placement, failures as results."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.verify.ep import envs
from onnxopt.verify.ep.runner import WorkerJob, run_worker, write_inputs

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) {
    t = Relu(x)
    y = Sigmoid(t)
}
"""
CPU = "CPUExecutionProvider"
OV = "OpenVINOExecutionProvider"


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A two-node model with named nodes and one stored input sample."""
    model = onnx.parser.parse_model(MODEL)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}_{node.op_type}"
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    sample = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}
    write_inputs(tmp_path / "in.npz", [sample], ["x"])
    return path, tmp_path / "in.npz", sample


def ov_python() -> str:
    """The managed OpenVINO interpreter, or skip (CI creates it with `onnxopt ep setup openvino`)."""
    py = envs.managed_python("openvino")
    if py is None:
        pytest.skip(f"no managed OpenVINO environment at {envs.env_dir('openvino')}; run `onnxopt ep setup openvino`")
    return str(py)


def test_cpu_outputs_placement_latency(tiny):
    model, inputs, sample = tiny
    job = WorkerJob(str(model), CPU, warmup=1, runs=4, record_placement=True)
    res = run_worker(sys.executable, job, inputs, ["x"], 1)
    assert res.ok, res.error
    expected = ort.InferenceSession(str(model), providers=[CPU]).run(None, sample)[0]
    np.testing.assert_array_equal(res.outputs[0]["y"], expected)
    assert len(res.latency_ms) == 4 and all(t > 0 for t in res.latency_ms)
    assert res.placement["method"] == "assignment_info"
    assert {(n["name"], n["ep"]) for n in res.placement["nodes"]} == {("n0_Relu", CPU), ("n1_Sigmoid", CPU)}


def test_placement_from_profiling(tiny):
    model, inputs, _ = tiny
    job = WorkerJob(str(model), CPU, record_placement=True, placement_method="profiling")
    res = run_worker(sys.executable, job, inputs, ["x"], 1)
    assert res.ok, res.error
    assert res.placement["method"] == "profiling"
    assert {n["name"] for n in res.placement["nodes"]} == {"n0_Relu", "n1_Sigmoid"}


def test_load_error_is_a_result(tiny, tmp_path):
    _, inputs, _ = tiny
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    res = run_worker(sys.executable, WorkerJob(str(bad), CPU), inputs, ["x"], 1)
    assert res.status == "error" and res.stage == "session" and "bad.onnx" in res.error


def test_missing_provider_is_unavailable(tiny):
    model, inputs, _ = tiny
    res = run_worker(sys.executable, WorkerJob(str(model), "CUDAExecutionProvider"), inputs, ["x"], 1)
    assert res.status == "unavailable" and "CUDAExecutionProvider" in res.error


def test_killed_worker_is_a_failed_result(tiny):
    model, inputs, _ = tiny
    job = WorkerJob(str(model), CPU, runs=10**8)

    def kill_soon(proc):
        threading.Timer(1.0, proc.send_signal, (signal.SIGKILL,)).start()

    res = run_worker(sys.executable, job, inputs, ["x"], 1, on_start=kill_soon)
    assert res.status == "error" and res.stage == "crash"
    assert "killed by signal SIGKILL" in res.error


def test_hanging_worker_times_out(tiny):
    model, inputs, _ = tiny
    res = run_worker(sys.executable, WorkerJob(str(model), CPU, runs=10**8), inputs, ["x"], 1, timeout=1.5)
    assert res.status == "error" and "timed out after 1.5 s" in res.error


def test_unstartable_interpreter(tiny):
    model, inputs, _ = tiny
    res = run_worker("/nonexistent/python", WorkerJob(str(model), CPU), inputs, ["x"], 1)
    assert res.status == "error" and "cannot start worker" in res.error


def test_resolution_order_and_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_HOME", str(tmp_path))
    monkeypatch.delenv("ONNXOPT_EP_PYTHON_OPENVINO", raising=False)
    cpu = envs.resolve_interpreter("cpu")
    assert cpu.available and cpu.source == "current interpreter"
    ov = envs.resolve_interpreter("openvino")
    if not ov.available:
        assert "onnxopt ep setup openvino" in ov.reason
    monkeypatch.setenv("ONNXOPT_EP_PYTHON_OPENVINO", "/nonexistent/python")
    named = envs.resolve_interpreter("openvino")
    assert not named.available and "env var" in named.reason and "/nonexistent/python" in named.reason


def test_cuda_skipped_reason_without_gpu(monkeypatch):
    monkeypatch.delenv("ONNXOPT_EP_PYTHON_CUDA", raising=False)
    if not envs.gpu_absent_reason():
        pytest.skip("this machine has an NVIDIA GPU")
    cuda = envs.resolve_interpreter("cuda")
    assert not cuda.available and "no NVIDIA GPU" in cuda.reason


def test_openvino_worker_places_nodes_on_openvino(tiny):
    python = ov_python()
    model, inputs, sample = tiny
    res = run_worker(python, WorkerJob(str(model), OV, record_placement=True, runs=2), inputs, ["x"], 1)
    assert res.ok, res.error + res.stderr_tail
    assert OV in res.providers_used
    assert {n["ep"] for n in res.placement["nodes"]} == {OV}
    expected = ort.InferenceSession(str(model), providers=[CPU]).run(None, sample)[0]
    np.testing.assert_allclose(res.outputs[0]["y"], expected, rtol=1e-5, atol=1e-6)
