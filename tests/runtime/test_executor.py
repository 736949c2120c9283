"""The local executor (in-process and a process pool): ordering, errors, retries after a dead worker,
shared objects, and calibration / sensitivity results identical to a single process."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

from onnxopt.data.observe import observe
from onnxopt.data.sharded_calibration import ObserverFactory, shard_bounds, sharded_observe
from onnxopt.errors import UserError
from onnxopt.runtime.executor import LocalExecutor, add_executor_arguments, executor_from_args, make_executor
from tests import scale_tasks
from tests.scale_tasks import tiny_model, tiny_samples


@pytest.fixture(scope="module")
def pool():
    with LocalExecutor(2) as ex:
        yield ex


def test_shard_bounds_cover_everything():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 8) == [(0, 1), (1, 2)]
    assert shard_bounds(5, 1) == [(0, 5)]


def test_map_in_process_and_pool_keep_item_order(pool):
    items = list(range(20))
    expected = [x * x for x in items]
    assert LocalExecutor(1).map(scale_tasks.square, items) == expected
    assert pool.map(scale_tasks.square, items) == expected


def test_task_exception_is_raised_not_retried(pool):
    with pytest.raises(ValueError, match="three"):
        LocalExecutor(1).map(scale_tasks.fail_on_three, range(5))
    with pytest.raises(ValueError, match="three"):
        pool.map(scale_tasks.fail_on_three, range(5))
    assert pool.map(scale_tasks.square, [3]) == [9]  # the pool recovers


def test_dead_worker_is_retried_with_the_same_result(tmp_path):
    items = [(str(tmp_path), x) for x in range(6)]
    with LocalExecutor(2) as ex:
        got = ex.map(scale_tasks.die_once, items)
        assert ex.restarts == 1
    assert (tmp_path / "died-2").exists()
    assert got == [x * 10 for x in range(6)]


def test_shared_object_reaches_pool_workers(pool):
    arrays = [np.full(1000, i, np.float32) for i in range(4)]
    handle = pool.share(arrays)
    assert pool.map(scale_tasks.shared_sum, [(handle, i) for i in range(4)]) == [1000.0 * i for i in range(4)]


def test_calibration_shards_are_bit_identical(pool, tmp_path):
    model, samples = tiny_model(), tiny_samples(24)
    tensors = ["x", "r1", "r2", "y"]
    single = observe(model, samples, tensors, ObserverFactory())
    for i, s in enumerate(samples):
        np.savez(tmp_path / f"{i:03d}.npz", **s)
    runs = {
        "1 process": sharded_observe(model, samples, tensors, LocalExecutor(1)),
        "1 process, 5 shards, from disk": sharded_observe(model, str(tmp_path), tensors, LocalExecutor(1), shards=5),
        "2 processes": sharded_observe(model, samples, tensors, pool),
        "2 processes, from disk": sharded_observe(model, str(tmp_path), tensors, pool),
        "2 processes, minmax": sharded_observe(model, samples, tensors, pool, ObserverFactory("minmax")),
    }
    minmax = observe(model, samples, tensors, ObserverFactory("minmax"))
    for name, got in runs.items():
        ref = minmax if "minmax" in name else single
        assert all(got[t] == ref[t] for t in tensors), name


def test_quantize_sensitivity_same_layers_in_process_and_pool(pool, tmp_path, monkeypatch):
    """The quantize pass's own trials (and its calibration, sharded on the pool) give the same SQNRs, layer
    decisions and model bytes in process and on 2 processes."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    model, samples = tiny_model(), tiny_samples(6)
    one = scale_tasks.quantize_sensitivity(model, samples, LocalExecutor(1), target_sqnr=45.0)
    two = scale_tasks.quantize_sensitivity(model, samples, pool, target_sqnr=45.0)
    assert one == two
    sens, decisions, _ = one
    assert {k.split(" (")[0] for k in sens} == {"Conv_0", "Conv_2", "Gemm_6"}
    assert all(20 < v < 200 for v in sens.values())
    assert any(not int8 for _, int8, _ in decisions) and any(int8 for _, int8, _ in decisions)


def test_optimize_command_runs_quantize_on_the_chosen_executor(tmp_path, monkeypatch):
    """`onnxopt optimize --workers 2`: quantize's calibration and trials on 2 processes, the same bytes."""
    import onnx

    from onnxopt.cli import main

    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    onnx.save(tiny_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.concatenate([s["x"] for s in tiny_samples(6)]))
    args = [
        "optimize",
        str(tmp_path / "m.onnx"),
        "--calib",
        str(tmp_path / "calib.npz"),
        "--quiet",
        "-p",
        "quantize{latency_aware=false,check_latency=false,cache=false,sensitivity_samples=4,target_sqnr=45}",
    ]
    assert main(args + ["-o", str(tmp_path / "one.onnx")]) == 0
    assert main(args + ["-o", str(tmp_path / "two.onnx"), "--workers", "2"]) == 0
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    assert main(args + ["-o", str(tmp_path / "x.onnx"), "--ray-address", "auto"]) == 2


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_executor_arguments(p)
    return p.parse_args(list(argv))


def test_executor_arguments():
    ex = executor_from_args(_args("--workers", "3"))
    assert isinstance(ex, LocalExecutor) and ex.workers == 3
    with pytest.raises(UserError, match="--workers"):
        executor_from_args(_args("--workers", "0"))
    with pytest.raises(UserError, match="--executor ray"):
        executor_from_args(_args("--ray-address", "auto"))


def test_ray_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'onnxopt\[ray\]'"):
        make_executor("ray")
