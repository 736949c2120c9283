"""Regressions found by the conformance corpus and the bad-input catalogue (each once failed).

- Optional-typed graph inputs/outputs (`test_identity_opt`): onnx-graphsurgeon
  cannot export them (UnboundLocalError in its exporter); `graph.export_model`
  now writes them untyped and restores the declared type.
- `Optional <type = ...>` (`test_if_opt`): gs drops TYPE_PROTO attributes, so
  the exported Optional was invalid; they now travel through gs encoded.
"""

from __future__ import annotations

import onnx
import pytest

import onnxopt
from onnxopt.testing.conformance import iter_cases, run_case


@pytest.fixture(scope="module")
def cases():
    wanted = {
        "test_identity_opt",
        "test_if_opt",
        "test_optional_has_element_empty_optional_input",
        "test_optional_get_element_optional_sequence",
    }
    return {c.name: c for c in iter_cases(["node"]) if c.name in wanted}


@pytest.mark.parametrize(
    "name",
    [
        "test_identity_opt",
        "test_if_opt",
        "test_optional_has_element_empty_optional_input",
        "test_optional_get_element_optional_sequence",
    ],
)
def test_optional_types_survive_fold_fuse(cases, name):
    case = cases[name]
    model, data = case.load()
    out = onnxopt.optimize(model, pipeline="fold,fuse").model
    onnx.checker.check_model(out, full_check=True)
    for a, b in zip(list(model.graph.input) + list(model.graph.output), list(out.graph.input) + list(out.graph.output)):
        assert a.name == b.name and a.type == b.type
    if run_case(model, data, case.rtol, case.atol) == "":  # some optional ops have no onnxruntime kernel
        assert run_case(out, data, case.rtol, case.atol) == ""


def test_type_proto_attribute_round_trips(cases):
    model, _ = cases["test_if_opt"].load()
    out = onnxopt.optimize(model, pipeline="fold").model
    attrs = [a for n in out.graph.node for g in n.attribute if g.HasField("g") for m in g.g.node for a in m.attribute]
    assert any(a.type == onnx.AttributeProto.TYPE_PROTO and a.name == "type" for a in attrs)
    assert not any(a.name.startswith("_onnxopt") for a in attrs)


def test_cse_does_not_merge_a_scalar_with_a_one_element_vector():
    """`test_rms_normalization_*_expanded`: fold's CSE keyed constants after np.ascontiguousarray, which turns
    a 0-d scalar 1-d, so ReduceMean's axes [1] were replaced by the scalar 1 (onnxruntime then fails)."""
    import numpy as np
    from conftest import parse, run_model

    m = parse("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[3, 4] x) => (float[3, 1] y, float[3] s) {
        one = Constant <value = int64 {1}> ()
        axes = Constant <value = int64[1] {1}> ()
        y = ReduceMean (x, axes)
        s = Gather <axis = 1> (x, one)
    }""")
    out = onnxopt.optimize(m, pipeline="fold").model
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y, s = run_model(out, {"x": x})
    np.testing.assert_allclose(y, x.mean(axis=1, keepdims=True))
    np.testing.assert_array_equal(s, x[:, 1])
