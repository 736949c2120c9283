"""`validate` with an executor: the accuracy runs in shards of samples on local processes (and Ray, in
tests/runtime/test_scale_ray.py) give the same per-output metrics and verdict as the single-process path, while
placement and latency are still measured on the driver."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest

import onnxopt
from onnxopt.runtime.executor import Executor, LocalExecutor
from onnxopt.verify.ep import envs
from onnxopt.verify.validate import ValidationReport, validate
from tests.conftest import real_model
from tests.verify.test_validate import cli, conv_models  # noqa: F401  (the fixture is used by name)


def cls_case(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    """PP-OCR's classifier, its fold,fuse result, a copy whose first Conv weight is scaled by 1.01, the EPs."""
    ref = real_model("cls")
    model = onnxopt.optimize(ref, pipeline="fold,fuse").model
    good = tmp_path / "cls.opt.onnx"
    onnx.save(model, good)
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv_w)
    init.CopyFrom(nh.from_array(nh.to_array(init) * np.float32(1.01), init.name))
    bad = tmp_path / "cls.perturbed.onnx"
    onnx.save(model, bad)
    eps = ["cpu"] + (["openvino"] if envs.resolve_interpreter("openvino").available else [])
    return ref, good, bad, eps


def accuracy(report: ValidationReport) -> tuple:
    """Everything validation says about accuracy (latency aside): per-output metrics, statuses, verdict."""
    return (
        [dataclasses.asdict(c) for c in report.pass_checks],
        report.pass_errors,
        [(e.ep, e.status, [dataclasses.asdict(c) for c in e.checks]) for e in report.eps],
        report.passed,
    )


def run_case(ref: Path, cand: Path, eps: list[str], executor: Executor | None) -> ValidationReport:
    return validate(
        ref, cand, eps, samples=5, seed=1, input_shapes={"x": (1, 3, 48, 192)}, runs=2, warmup=1, executor=executor
    )


def test_sharded_validation_equals_single_process(tmp_path):
    ref, good, bad, eps = cls_case(tmp_path)
    with LocalExecutor(2) as pool:
        for cand, verdict in ((good, True), (bad, False)):
            single = run_case(ref, cand, eps, None)
            assert single.passed is verdict
            for executor in (LocalExecutor(1), pool):
                got = run_case(ref, cand, eps, executor)
                assert accuracy(got) == accuracy(single), executor.describe()
                for e in got.eps:  # measured on the driver, not the workers
                    assert e.latency and e.latency.cand_ms and e.latency.ref_ms and e.placement, e.ep
    failed = {c.check for c in single.pass_checks + [c for e in single.eps for c in e.checks] if c.violations}
    assert "pass" in failed


def test_broken_candidate_exits_1_with_two_workers(conv_models, capsys):  # noqa: F811
    ref, broken = conv_models
    assert cli(str(ref), str(ref), "--workers", "2") == 0
    assert cli(str(ref), str(broken), "--workers", "2") == 1
    out = capsys.readouterr().out
    assert "result: FAILED" in out and "cosine" in out


def test_executor_options_are_checked(conv_models):  # noqa: F811
    from onnxopt.errors import UserError

    ref, _ = conv_models
    with pytest.raises(UserError, match="--ray-address needs --executor ray"):
        cli(str(ref), str(ref), "--ray-address", "auto")
