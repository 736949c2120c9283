"""No silent no-op: a pass that changes nothing says why, in its result, the pass record and the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

import onnxopt
from onnxopt.framework.context import PassContext
from onnxopt.framework.manager import PassManager, noop_reason
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.registry import get_pass
from onnxopt.ir.graph import import_model
from onnxopt.report.tables import count_reasons, format_report

#: Nothing to fold, fuse, prune or factorize: one activation-times-activation MatMul and a Relu.
NOTHING = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[1, 8, 16] q, float[1, 16, 8] k) => (float[1, 8, 8] y) {
    s = MatMul (q, k)
    y = Relu (s)
}
"""


def _data(k: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            "q": rng.standard_normal((1, 8, 16)).astype(np.float32),
            "k": rng.standard_normal((1, 16, 8)).astype(np.float32),
        }
        for _ in range(k)
    ]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", ["fold", "fuse", "prune", "lowrank", "quantize"])
def test_every_builtin_pass_says_why_it_changed_nothing(name):
    model = onnx.parser.parse_model(NOTHING)
    res = onnxopt.optimize(model, pipeline=name, calibration=_data())
    rec = res.report["passes"][0]
    assert not rec["changed"]
    assert rec["reason"] and "gave no reason" not in rec["reason"]
    assert f"{name}: changed nothing: {rec['reason']}" in format_report(res.report)


def test_lowrank_names_the_layers_it_found_too_small():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[4, 8] x) => (float[4, 8] y) {
        y = MatMul (x, W)
    }
    """)
    model.graph.initializer.append(nh.from_array(np.eye(8, dtype=np.float32), "W"))
    graph = import_model(model)
    result = get_pass("lowrank")().run(graph, PassContext())
    assert not result.changed
    assert result.reason == (
        "no factorizable layer among Gemm|MatMul (at least 1024 weight parameters): "
        "1 x weight 8x8 below min_params=1024"
    )


class _Silent(Pass):
    """A pass that changes nothing and breaks the contract by not saying why."""

    name = "silent"

    def run(self, graph, ctx):
        return PassResult(changed=False)


def test_manager_flags_a_pass_that_gives_no_reason():
    pm = PassManager([_Silent()], collect_stats=False)
    pm.run(import_model(onnx.parser.parse_model(NOTHING)))
    assert pm.records[0].reason == "pass 'silent' changed nothing and gave no reason"
    assert noop_reason("x", PassResult(changed=True, reason="ignored")) == ""


def test_count_reasons_orders_by_frequency_and_caps():
    rows = [{"why": "slower"}, {"why": "sensitive"}, {"why": "slower"}, {"why": ""}, {"why": "a"}, {"why": "b"}]
    assert count_reasons(rows, "why", 2) == "2 x slower; 1 x a; 2 other reasons"
    assert count_reasons([], "why") == ""


def test_quantize_says_every_layer_stayed_float_and_why():
    """latency_aware with every layer slower in int8 (as on a CPU without VNNI): the reason names it."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[4, 64] x) => (float[4, 64] y) {
        y = MatMul (x, W)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(
        nh.from_array(
            (
                np.random.default_rng(0).standard_normal((64, 8)) @ np.random.default_rng(1).standard_normal((8, 64))
            ).astype(np.float32),
            "W",
        )
    )
    data = [{"x": np.random.default_rng(s).standard_normal((4, 64)).astype(np.float32)} for s in range(3)]
    res = onnxopt.optimize(
        model, pipeline="quantize{weight_storage=float,target_sqnr=300,latency_aware=false}", calibration=data
    )
    rec = res.report["passes"][0]
    assert not rec["changed"]
    assert rec["reason"].startswith("kept all 1 layers float: 1 x sensitive")
