"""Property-based fuzzing (hypothesis): random small graphs keep their outputs through exact pipelines.

Graphs come from `fuzz_graphs.specs()` (Conv/Gemm/MatMul/Add/Mul/Relu/Concat/
Reshape/Transpose/BatchNormalization plus Shape/Gather/Concat/Reshape with a
dynamic batch). Each is optimized at batch 2 and compared with the original at
batches 2, 3 and 1 (rtol 1e-4, atol 1e-5). CI runs a derandomized profile;
ONNXOPT_FUZZ=deep runs many more examples. A failure hypothesis shrinks goes
into tests/regressions/ as a plain test.
"""

from __future__ import annotations

import os

from fuzz_graphs import Spec, assert_same_outputs, build, specs
from hypothesis import HealthCheck, given, settings

settings.register_profile(
    "onnxopt-ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "onnxopt-deep", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = "onnxopt-deep" if os.environ.get("ONNXOPT_FUZZ") == "deep" else "onnxopt-ci"


@settings(settings.get_profile(PROFILE))
@given(spec=specs())
def test_fold_fuse_keeps_outputs(spec: Spec):
    assert_same_outputs(spec, "fold,fuse")


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples // 2)
@given(spec=specs(zero_channels=True))
def test_exact_prune_keeps_outputs_with_dead_channels(spec: Spec):
    assert_same_outputs(spec, "fold,fuse,prune{exact=true,macs=0}")


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples // 2)
@given(spec=specs(low_rank=True))
def test_lowrank_at_full_rank_keeps_outputs(spec: Spec):
    assert_same_outputs(spec, "fold,lowrank{energy=1.0,timing=false,multiple=1,min_params=0}")


def test_generated_graphs_cover_every_op():
    ops = {
        n.op_type
        for s in ("conv", "bn", "add", "mul", "relu", "concat", "transpose", "reshape")
        for n in build(Spec(ops=(s, "gemm", "matmul", "bn", "concat"), const_expr=True)).graph.node
    }
    assert {
        "Conv",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Relu",
        "Concat",
        "Reshape",
        "Transpose",
        "BatchNormalization",
        "Shape",
        "Gather",
        "Constant",
    } <= ops


def test_exact_prune_removes_dead_channels():
    import onnxopt

    spec = Spec(ops=("conv", "relu", "conv"), channels=3, size=4, seed=5, zero_channels=2)
    res = onnxopt.optimize(build(spec), pipeline="prune{exact=true,macs=0}")
    assert_same_outputs(spec, "prune{exact=true,macs=0}")
    assert res.report["after"]["parameters"] < res.report["before"]["parameters"]


def test_lowrank_factorizes_an_exactly_low_rank_weight():
    import onnxopt

    spec = Spec(ops=("flatten", "matmul", "relu"), channels=6, size=5, seed=3, low_rank=1)
    res = onnxopt.optimize(build(spec), pipeline="lowrank{energy=1.0,timing=false,multiple=1,min_params=0}")
    assert_same_outputs(spec, "lowrank{energy=1.0,timing=false,multiple=1,min_params=0}")
    assert res.report["after"]["parameters"] < res.report["before"]["parameters"]
