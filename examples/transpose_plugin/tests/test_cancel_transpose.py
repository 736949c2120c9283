"""Tests of `cancel-transpose`, written as a plugin's own tests: only `onnxopt`, `onnxopt.testing`."""

from __future__ import annotations

import onnx
import pytest
from onnxopt_transpose_plugin import CancelTranspose, composes_to_identity

import onnxopt
from onnxopt.testing import apply_pass, check_pass_contract, model_from_text, tiny_models


def _ops(model: onnx.ModelProto) -> list[str]:
    """Op types of every node, bodies included, in graph order."""
    out = []
    stack = [model.graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            out.append(n.op_type)
            stack.extend(a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return out


@pytest.mark.parametrize(
    "first,second,cancels",
    [
        ([0, 2, 3, 1], [0, 3, 1, 2], True),
        ([0, 2, 1], [0, 2, 1], True),
        ([1, 2, 0], [2, 0, 1], True),
        ([1, 2, 0], [1, 2, 0], False),
        ([0, 2, 3, 1], [0, 2, 3, 1], False),
        (None, None, True),
        (None, [2, 1, 0], True),
        ([0, 2, 1], None, False),
    ],
)
def test_composition_is_identity_exactly_when_the_perms_are_inverse(first, second, cancels):
    assert composes_to_identity(first, second) is cancels


@pytest.mark.parametrize("name", sorted(tiny_models()))
def test_keeps_the_pass_contract_on_every_tiny_model(name):
    check_pass_contract("cancel-transpose", tiny_models()[name])


def test_cancels_the_pair_in_the_main_graph():
    out, result = apply_pass(CancelTranspose, tiny_models()["transposes"])
    assert result.changed and result.stats == {"cancelled_pairs": 1, "in_subgraphs": 0}
    assert _ops(out) == ["Relu"]


def test_cancels_the_pair_inside_an_if_branch():
    report = check_pass_contract("cancel-transpose", tiny_models()["if_branches"])
    assert report.result.stats == {"cancelled_pairs": 1, "in_subgraphs": 1}
    assert "Transpose" not in _ops(report.model)


def test_a_chain_of_pairs_cancels_from_the_inside_out():
    model = model_from_text("""
        chain (float[2, 3, 4] x) => (float[2, 3, 4] y) {
            a = Transpose <perm = [1, 2, 0]> (x)
            b = Transpose <perm = [0, 2, 1]> (a)
            c = Transpose <perm = [0, 2, 1]> (b)
            d = Transpose <perm = [2, 0, 1]> (c)
            y = Relu (d)
        }
    """)
    report = check_pass_contract(CancelTranspose, model)
    assert report.result.stats["cancelled_pairs"] == 2 and _ops(report.model) == ["Relu"]


def test_a_graph_output_keeps_its_name():
    model = model_from_text("""
        out (float[2, 3] x) => (float[2, 3] y) {
            t = Transpose <perm = [1, 0]> (x)
            y = Transpose (t)
        }
    """)
    report = check_pass_contract("cancel-transpose", model)
    assert [o.name for o in report.model.graph.output] == ["y"] and _ops(report.model) == ["Identity"]


@pytest.mark.parametrize(
    "body",
    [
        # not inverse: the layout really changes
        "t = Transpose <perm = [1, 2, 0]> (x)\n y = Transpose <perm = [1, 2, 0]> (t)",
        # a Relu in between: not directly followed
        "t = Transpose <perm = [0, 2, 1]> (x)\n r = Relu (t)\n y = Transpose <perm = [0, 2, 1]> (r)",
    ],
)
def test_does_not_fire_when_the_pair_does_not_cancel(body):
    model = model_from_text(f"keep (float[3, 3, 3] x) => (float[3, 3, 3] y) {{\n {body}\n}}")
    report = check_pass_contract("cancel-transpose", model)
    assert not report.result.changed and "inverse" in report.result.reason
    assert _ops(report.model).count("Transpose") == 2


def test_the_first_transpose_stays_while_something_else_reads_it():
    model = model_from_text("""
        shared (float[2, 3] x) => (float[2, 3] y, float[3, 2] t) {
            t = Transpose <perm = [1, 0]> (x)
            y = Transpose <perm = [1, 0]> (t)
        }
    """)
    report = check_pass_contract("cancel-transpose", model)
    assert report.result.changed and _ops(report.model).count("Transpose") == 1


def test_runs_in_a_pipeline_after_the_builtins():
    res = onnxopt.optimize(tiny_models()["if_branches"], pipeline="fold,cancel-transpose", check=2)
    assert res.report["check"]["ok"]
    assert [r["name"] for r in res.report["passes"]] == ["fold", "cancel-transpose"]
