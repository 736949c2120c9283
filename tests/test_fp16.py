"""The `fp16` pass: float16 compute with float32 inputs and outputs, measured float32 fallbacks, no Cast round trips."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.data.samples import seeded_inputs
from onnxopt.errors import UserError
from onnxopt.kernels.fp16 import ErrorEnergyObserver, cast_sqnr_db, fits_fp16
from onnxopt.runtime.sessions import make_session
from onnxopt.testing import apply_pass, check_pass_contract, model_from_text, tiny_models

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def _signature(model: onnx.ModelProto) -> list:
    return [(v.name, v.type.SerializeToString()) for v in list(model.graph.input) + list(model.graph.output)]


def _removable_cast_pairs(model: onnx.ModelProto) -> list[str]:
    """Cast nodes that directly undo a Cast between float32 and float16."""
    made = {o: n for n in model.graph.node for o in n.output}
    found = []
    for n in model.graph.node:
        first = made.get(n.input[0]) if n.op_type == "Cast" else None
        if first is not None and first.op_type == "Cast":
            pair = {a.i for a in first.attribute if a.name == "to"} | {a.i for a in n.attribute if a.name == "to"}
            if pair == {F16, F32}:
                found.append(n.name)
    return found


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return make_session(model).run(None, feeds)


def _calib(model: onnx.ModelProto, n: int = 4, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    return [{k: v * scale if v.dtype.kind == "f" else v for k, v in s.items()} for s in seeded_inputs(model, n, seed=0)]


@pytest.mark.parametrize("name", sorted(tiny_models()))
def test_contract_on_every_tiny_model(name):
    model = tiny_models()[name]
    report = check_pass_contract("fp16", model, calibration=_calib(model))
    assert _signature(report.model) == _signature(model)
    assert not _removable_cast_pairs(report.model)


def test_keep_io_types_float16_weights_and_boundary_casts():
    model = tiny_models()["conv_bn_relu"]
    out, result = apply_pass("fp16", model, calibration=_calib(model))
    assert result.changed and result.stats["fp16_nodes"] == 3
    assert _signature(out) == _signature(model)
    dtypes = {t.name: t.data_type for t in out.graph.initializer}
    assert dtypes["W"] == dtypes["B"] == F16 and dtypes["mean"] == F32  # BatchNormalization statistics: own type
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert sorted(a.i for n in casts for a in n.attribute) == [F32, F16]
    feeds = _calib(model, 1)[0]
    (ref,), (got,) = _run(model, feeds), _run(out, feeds)
    assert got.dtype == np.float32 and np.allclose(got, ref, rtol=1e-2, atol=1e-2)
    assert sum(t.ByteSize() for t in out.graph.initializer) < 0.6 * sum(t.ByteSize() for t in model.graph.initializer)


def test_a_node_whose_calibrated_range_overflows_stays_float32():
    model = model_from_text(
        """
        big (float[1, 16] x) => (float[1, 16] y) {
            a = Mul (x, k)
            b = Div (a, k)
            y = Relu (b)
        }
        """,
        {"k": np.full((1, 16), 3000.0, np.float32)},
    )
    calib = _calib(model, scale=20.0)  # |x * 3000| reaches about 1e5, over 65504
    out, result = apply_pass("fp16", model, calibration=calib)
    kept = {s["node"]: s["reason"] for s in result.skipped}
    ops = {n.name: n.op_type for n in out.graph.node}
    assert sorted(ops[n] for n in kept) == ["Div", "Mul"] and all("range" in r for r in kept.values())
    assert result.stats["fp16_nodes"] == 1
    (ref,), (got,) = _run(model, calib[0]), _run(out, calib[0])
    assert np.isfinite(got).all() and np.allclose(got, ref, rtol=1e-2, atol=1e-2)
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "k")).dtype == np.float32


def test_a_node_that_loses_precision_is_measured_and_stays_float32():
    """x - 1000 where x = 1000 + small: float16 keeps 0.5 steps at 1000, so the difference is noise."""
    model = model_from_text(
        """
        cancel (float[1, 64] x) => (float[1, 64] y) {
            d = Sub (x, c)
            y = Mul (d, s)
        }
        """,
        {"c": np.full((1, 64), 1000.0, np.float32), "s": np.full((1, 64), 2.0, np.float32)},
    )
    calib = [{"x": 1000.0 + 0.05 * s["x"]} for s in _calib(model)]
    out, result = apply_pass("fp16", model, calibration=calib)
    kept = {s["op"]: s["reason"] for s in result.skipped}
    assert list(kept) == ["Sub"] and kept["Sub"].startswith("error:")
    sub = next(n for n in out.graph.node if n.op_type == "Sub")
    dtypes = {t.name: t.data_type for t in out.graph.initializer}
    assert list(sub.input) == ["x", "c"] and dtypes == {"c": F32, "s": F16}  # Sub reads float32, Mul float16


def test_a_cast_round_trip_is_removed():
    model = model_from_text(
        """
        trip (float[1, 8] x) => (float[1, 8] y) {
            h = Cast <to = 10> (x)
            f = Cast <to = 1> (h)
            r = Relu (f)
            y = Sigmoid (r)
        }
        """
    )
    assert _removable_cast_pairs(model)
    out, result = apply_pass("fp16", model, calibration=_calib(model))
    assert result.stats["cast_pairs_removed"] >= 1
    assert not _removable_cast_pairs(out)
    assert [n.op_type for n in out.graph.node].count("Cast") == 2  # one in, one out


def test_resize_scales_and_roi_stay_float32():
    model = model_from_text(
        """
        up (float[1, 2, 4, 4] x) => (float[1, 2, 8, 8] y) {
            r = Resize <mode = "nearest"> (x, roi, scales)
            y = Relu (r)
        }
        """,
        {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
    )
    out, result = apply_pass("fp16", model, calibration=_calib(model))
    assert result.stats["fp16_nodes"] == 2
    dtypes = {t.name: t.data_type for t in out.graph.initializer}
    assert dtypes == {"roi": F32, "scales": F32}
    onnx.checker.check_model(out, full_check=True)
    feeds = _calib(model, 1)[0]
    assert np.allclose(_run(out, feeds)[0], _run(model, feeds)[0], rtol=1e-2, atol=1e-2)


def test_control_flow_is_left_float_with_its_reason():
    model = tiny_models()["if_branches"]
    out, result = apply_pass("fp16", model, calibration=_calib(model))
    assert not result.changed and result.reason
    assert any(s["op"] == "If" and "control flow" in s["reason"] for s in result.skipped)


def test_the_cpu_target_is_told_that_float16_is_slower():
    model = tiny_models()["matmul_add"]
    _, on_cpu = apply_pass("fp16", model, calibration=_calib(model))
    assert "slower" in on_cpu.reason and "slower" in on_cpu.stats["expected"]
    _, on_ov = apply_pass("fp16", model, calibration=_calib(model), settings={"target": "openvino"})
    assert on_ov.reason == "" and "expected" not in on_ov.stats


def test_a_converted_model_is_left_alone_and_data_is_required():
    model = tiny_models()["matmul_add"]
    out, _ = apply_pass("fp16", model, calibration=_calib(model))
    again, result = apply_pass("fp16", out, calibration=_calib(model))
    assert not result.changed and "float16" in result.reason
    with pytest.raises(UserError, match="calibration"):
        apply_pass("fp16", model)


def test_kernels():
    assert fits_fp16(1000.0, 4.0) and not fits_fp16(20000.0, 4.0) and not fits_fp16(math.inf, 1.0)
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert 60 < cast_sqnr_db(x) < 80
    assert cast_sqnr_db(np.array([1e5], np.float32)) == -math.inf
    assert cast_sqnr_db(np.array([0.5, 1.0], np.float32)) == math.inf
    a, b = ErrorEnergyObserver().update(x[:500]), ErrorEnergyObserver().update(np.append(x[500:], np.nan))
    whole = ErrorEnergyObserver().update(x)
    merged = a.merge(b)
    assert merged.count == whole.count and merged.nonfinite == 1 and math.isclose(merged.energy, whole.energy)


def test_an_input_of_unknown_type_keeps_its_reader_float32():
    """Regression (tashkeel): a MatMul whose one input the shapes analysis left untyped was converted
    with the other input only, binding its type T to float16 and float32 at once."""
    from onnxopt.ir.graph import import_model
    from onnxopt.passes.fp16.eligibility import Eligible, classify

    model = tiny_models()["nothing_to_do"]
    graph = import_model(model)
    node = next(n for n in graph.nodes if n.op == "MatMul")
    types = {t.name: F32 for n in graph.nodes for t in list(n.inputs) + list(n.outputs)}
    assert isinstance(classify(node, 17, types), Eligible)
    del types[node.inputs[0].name]
    assert classify(node, 17, types) == "an input of the compute type has no inferred float32 type"
