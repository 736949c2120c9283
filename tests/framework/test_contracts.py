"""Contracts every registered pass must keep: valid output, honest `changed`, determinism, idempotence.

Runs each pass (with calibration data for those that need it) on small real
graphs; plugins installed in the environment are held to the same contract.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import real_model

import onnxopt
from onnxopt.data.samples import seeded_inputs
from onnxopt.framework.registry import all_passes
from onnxopt.testing import check_pass_contract, tiny_models

#: Passes whose second run may legitimately change the graph again (budgets apply to the current model).


def _prepared(name: str) -> onnx.ModelProto:
    return onnxopt.optimize(real_model(name), pipeline="fold,fuse").model


@pytest.fixture(scope="module")
def cls_model():
    return _prepared("cls")


@pytest.mark.parametrize("pass_name", sorted(all_passes()))
def test_pass_contract(pass_name, cls_model):
    cls = all_passes()[pass_name]
    shapes = {"x": (1, 3, 48, 192)}
    calib = seeded_inputs(cls_model, 4, seed=0, input_shapes=shapes) if cls.needs_data or not cls.idempotent else None
    calib = [{k: np.abs(v) for k, v in s.items()} for s in calib] if calib else None
    check_pass_contract(
        cls,
        cls_model,
        calibration=calib,
        settings={"input_shapes": shapes},
        check_outputs=cls.tolerance == "exact",
    )


@pytest.mark.parametrize("model_name", sorted(tiny_models()))
@pytest.mark.parametrize("pass_name", ["fold", "fuse"])
def test_exact_builtin_passes_keep_the_contract_on_every_tiny_model(pass_name, model_name):
    check_pass_contract(pass_name, tiny_models()[model_name])


def test_pipeline_options_are_parsed_and_checked():
    from onnxopt.errors import UserError
    from onnxopt.framework.pipeline import build_pipeline, parse_pipeline

    assert parse_pipeline("simplify") == [("fold", {}), ("fuse", {})]
    assert parse_pipeline("fold{size_limit_mb=2, shapes=false},fuse") == [
        ("fold", {"size_limit_mb": "2", "shapes": "false"}),
        ("fuse", {}),
    ]
    (fold,) = build_pipeline("fold{size_limit_mb=2,shapes=no}")
    assert fold.options.size_limit_mb == 2.0 and fold.options.shapes is False
    for bad, words in [
        ("nosuchpass", "unknown pass"),
        ("fold{nosuch=1}", "unknown option"),
        ("fold{size_limit_mb=big}", "expects float"),
        ("fold{shapes}", "needs a value"),
        ("fold{", "cannot parse"),
        ("", "empty pipeline"),
    ]:
        with pytest.raises(UserError, match=words):
            build_pipeline(bad)


def test_pass_manager_dumps_and_verifies_each_pass(tmp_path):
    res = onnxopt.optimize(real_model("cls"), pipeline="fold,fuse", dump_dir=tmp_path, verify_each=True)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["00_input.onnx", "01_fold.onnx", "02_fuse.onnx"]
    rec = res.report["passes"]
    assert [r["name"] for r in rec] == ["fold", "fuse"] and all(r["seconds"] >= 0 for r in rec)
    assert rec[-1]["after"]["nodes"] == res.report["after"]["nodes"]


def test_verify_each_names_the_pass_that_broke_the_model():
    from dataclasses import dataclass

    import onnx_graphsurgeon as gs

    from onnxopt.errors import CheckFailed
    from onnxopt.framework.manager import PassManager
    from onnxopt.framework.pass_api import Pass, PassResult

    class Breaker(Pass):
        name = "breaker"

        @dataclass
        class Options:
            pass

        def run(self, graph: gs.Graph, ctx):
            graph.nodes[0].op = "NoSuchOp"
            return PassResult(changed=True)

    model = onnxopt.optimize(real_model("cls"), pipeline="fold").model
    with pytest.raises(CheckFailed, match="after pass 1 'breaker'"):
        PassManager([Breaker()], verify_each=True).run_model(model)
