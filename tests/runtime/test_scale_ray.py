"""The Ray executor on a local instance of 2 CPUs: calibration ranges, sensitivity decisions and validation
metrics identical to the local executor (1 and 2 processes), a killed worker retried, optimize-many
byte-identical."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'onnxopt[ray]'")

from onnxopt.cli import main  # noqa: E402
from onnxopt.data.samples import CalibrationData, seeded_inputs  # noqa: E402
from onnxopt.data.sharded_calibration import sharded_observe  # noqa: E402
from onnxopt.ir.model_io import load_model  # noqa: E402
from onnxopt.kernels.ranges import range_minmax, range_percentile  # noqa: E402
from onnxopt.runtime.executor import LocalExecutor, RayExecutor, ray_init_local  # noqa: E402
from tests import scale_tasks  # noqa: E402
from tests.cli.test_fleet import write_fleet  # noqa: E402
from tests.conftest import real_model  # noqa: E402
from tests.verify.test_validate_sharded import accuracy, cls_case, run_case  # noqa: E402


@pytest.fixture(scope="module")
def executors():
    """One local Ray instance (2 CPUs) for the whole module, plus a 2-process pool and the in-process executor."""
    ray_init_local(num_cpus=2)
    try:
        with LocalExecutor(2) as pool:
            yield {"local-1": LocalExecutor(1), "local-2": pool, "ray": RayExecutor()}
    finally:
        ray.shutdown()


def test_ray_map_order_errors_and_shared_objects(executors):
    ex = executors["ray"]
    assert ex.workers == 2
    assert ex.map(scale_tasks.square, range(10)) == [x * x for x in range(10)]
    with pytest.raises(ValueError, match="three"):
        ex.map(scale_tasks.fail_on_three, range(5))
    import numpy as np

    handle = ex.share([np.full(10, i, np.float32) for i in range(3)])
    assert ex.map(scale_tasks.shared_sum, [(handle, i) for i in range(3)]) == [0.0, 10.0, 20.0]


def test_ray_retries_a_killed_worker(executors, tmp_path):
    got = executors["ray"].map(scale_tasks.die_once, [(str(tmp_path), x) for x in range(4)])
    assert (tmp_path / "died-2").exists()
    assert got == [0, 10, 20, 30]


def test_calibration_and_sensitivity_identical_on_every_executor(executors, tmp_path, monkeypatch):
    """PP-OCR's classifier: histograms bit-identical, so every range; the quantize pass (its calibration sharded
    on the executor, its per-layer trials run there): every trial's SQNR, every decision, the model's bytes."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    model = load_model(real_model("cls"))
    data = CalibrationData(seeded_inputs(model, 12, seed=0, input_shapes={"x": (1, 3, 48, 192)}), model)
    mac_inputs = sorted({n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")})
    stats = {name: sharded_observe(model, data, mac_inputs, ex) for name, ex in executors.items()}
    ref = stats["local-1"]
    for name, got in stats.items():
        assert all(got[t] == ref[t] for t in mac_inputs), name
        assert [range_percentile(got[t], 99.99) for t in mac_inputs] == [
            range_percentile(ref[t], 99.99) for t in mac_inputs
        ]
        assert [range_minmax(got[t]) for t in mac_inputs] == [range_minmax(ref[t]) for t in mac_inputs]
    runs = {name: scale_tasks.quantize_sensitivity(model, data, ex, target_sqnr=40.0) for name, ex in executors.items()}
    assert runs["local-2"] == runs["local-1"] and runs["ray"] == runs["local-1"]
    decisions = runs["local-1"][1]
    assert any(not int8 for _, int8, _ in decisions) and any(int8 for _, int8, _ in decisions)


def test_optimize_many_on_ray_matches_local(executors, tmp_path):
    assert main(["optimize-many", str(write_fleet(tmp_path, "local"))]) == 0
    assert main(["optimize-many", str(write_fleet(tmp_path, "ray")), "--executor", "ray"]) == 0
    for name in ("tiny", "cls"):
        assert (tmp_path / "ray" / f"{name}.opt.onnx").read_bytes() == (
            tmp_path / "local" / f"{name}.opt.onnx"
        ).read_bytes()
    assert ray.is_initialized()  # the command reused the test's Ray session and left it running


def test_validation_on_ray_matches_local(executors, tmp_path):
    """The fold,fuse result and a perturbed copy of PP-OCR's classifier on cpu (+openvino): per-output metrics
    and verdicts equal on every executor; latency and placement measured on the driver."""
    ref, good, bad, eps = cls_case(tmp_path)
    for cand, verdict in ((good, True), (bad, False)):
        got = {name: run_case(ref, cand, eps, ex) for name, ex in executors.items()}
        assert got["local-1"].passed is verdict
        assert accuracy(got["ray"]) == accuracy(got["local-1"]) == accuracy(got["local-2"])
        assert all(e.latency and e.latency.cand_ms and e.placement for e in got["ray"].eps)
