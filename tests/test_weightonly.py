"""The weightonly pass and its kernels: packing, numbers against a numpy reference, GPTQ against
RTN on correlated inputs, the pass contract, layers left alone, and the openvino form."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnxopt.kernels.blockquant import (
    awq_search,
    dequantize,
    output_error,
    pack_matmul_nbits,
    quantize_rtn,
    unpack_matmul_nbits,
)
from onnxopt.kernels.gptq import gptq_quantize
from onnxopt.testing import apply_pass, check_pass_contract, model_from_text

NO_TIMING = {"timing": "false", "min_elements": "0"}


def _matmul_model(k: int, n: int, seed: int = 0, opset: int = 17):
    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.1).astype(np.float32)
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[B, {k}] x) => (float[B, {n}] y) {{ y = MatMul(x, W) }}"""
    return model_from_text(text, {"W": w}), w


def _run(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _correlated(k: int, rows: int, seed: int = 1) -> np.ndarray:
    """Inputs that mostly live in a k/8-dimensional subspace, with channels of uneven magnitude."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(0).standard_normal((k // 8, k))
    scale = np.exp(np.random.default_rng(1).standard_normal(k))
    x = rng.standard_normal((rows, k // 8)) @ mix + 0.1 * rng.standard_normal((rows, k))
    return (x * scale).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,block", [(128, 32), (120, 32), (100, 128)])
def test_packing_round_trip(bits: int, k: int, block: int) -> None:
    w = np.random.default_rng(0).standard_normal((k, 24))
    bq = quantize_rtn(w, bits, block)
    B, S, Z = pack_matmul_nbits(bq)
    kb = -(-k // block)
    assert B.shape == (24, kb, block * bits // 8) and S.shape == (24, kb) and Z.shape == (24, -(-kb * bits // 8))
    back = unpack_matmul_nbits(B, S, Z, k, bits, block)
    assert np.array_equal(back.q, bq.q) and np.array_equal(back.zero_points, bq.zero_points)
    assert np.array_equal(back.scales, bq.scales)
    # the codes' reference: q = clip(round(w / s) + z) per (block, column), 0 inside every block's range
    rows = np.arange(k) // block
    ref = np.clip(np.round(w / bq.scales[rows]) + bq.zero_points[rows], 0, 2**bits - 1)
    assert np.array_equal(bq.q, ref.astype(np.uint8))
    assert np.abs(dequantize(bq) - w).max() <= bq.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("bits", ["4", "8"])
@pytest.mark.parametrize("k,block", [(128, "32"), (120, "32"), (96, "128")])
def test_matmulnbits_matches_numpy_dequantized_reference(bits: str, k: int, block: str) -> None:
    model, w = _matmul_model(k, 40)
    out, res = apply_pass("weightonly", model, options={**NO_TIMING, "bits": bits, "block": block, "rounding": "rtn"})
    assert res.changed and [n.op_type for n in out.graph.node] == ["MatMulNBits"]
    ref_q = dequantize(quantize_rtn(w.astype(np.float64), int(bits), int(block), clip_search=True))
    x = np.random.default_rng(2).standard_normal((3, k)).astype(np.float32)
    y = _run(out, x)
    np.testing.assert_allclose(y, x.astype(np.float64) @ ref_q, rtol=1e-4, atol=1e-4)
    assert res.details[0]["form"] == f"int{bits}"


def test_gptq_reduces_output_error_vs_rtn_on_correlated_inputs() -> None:
    x = _correlated(128, 4000)
    H = x.astype(np.float64).T @ x / len(x)
    w = np.random.default_rng(3).standard_normal((128, 64)) * 0.1
    rtn = output_error(w, dequantize(quantize_rtn(w, 4, 32, clip_search=True)), H)
    gptq = output_error(w, dequantize(gptq_quantize(w, H, 4, 32)), H)
    _, _, awq = awq_search(w, H, 4, 32)
    assert gptq < 0.95 * rtn and awq <= rtn


@pytest.mark.parametrize("rounding", ["gptq", "awq"])
def test_data_aware_pass_lowers_calibration_output_error(rounding: str) -> None:
    model, w = _matmul_model(128, 64, seed=4)
    calib = [{"x": _correlated(128, 256, seed=s)} for s in range(4)]
    x = np.concatenate([c["x"] for c in calib])
    ref = x @ w
    errs = {}
    for r in ("rtn", rounding):
        out, res = apply_pass("weightonly", model, options={**NO_TIMING, "rounding": r}, calibration=calib)
        errs[r] = float(np.linalg.norm(_run(out, x) - ref) / np.linalg.norm(ref))
    assert errs[rounding] < 0.95 * errs["rtn"]
    if rounding == "awq":
        assert any(n.op_type == "Mul" for n in out.graph.node)


def test_contract() -> None:
    model, _ = _matmul_model(128, 64)
    check_pass_contract("weightonly", model, options=NO_TIMING, check_outputs=False)
    check_pass_contract("weightonly", model, options=NO_TIMING, settings={"target": "openvino"}, check_outputs=False)


def test_layers_left_alone_say_why() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 64] x, float[64, 32] w) => (float[2, 32] y, float[2, 8] z) {
        y = MatMul(x, w)
        z = MatMul(x, S)
    }"""
    small = np.ones((64, 8), np.float32)
    model = model_from_text(text, {"S": small})
    out, res = apply_pass("weightonly", model, options={"timing": "false"})
    assert not res.changed and "no constant MatMul/Gemm weight" in res.reason
    reasons = {r["node"] or r["op"]: r["reason"] for r in res.skipped}
    assert any("not a constant" in v for v in reasons.values())
    assert any("min_elements" in v for v in reasons.values())


def test_gemm_trans_b_with_bias_and_k_not_a_multiple_of_the_block() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 100)) * 0.1).astype(np.float32)  # N x K with transB
    c = rng.standard_normal(48).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 100] x) => (float[3, 48] y) { y = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, W, C) }"""
    model = model_from_text(text, {"W": w, "C": c})
    out, res = apply_pass("weightonly", model, options={**NO_TIMING, "bits": "8", "rounding": "rtn"})
    assert res.changed and {n.op_type for n in out.graph.node} == {"MatMulNBits", "Add"}
    x = rng.standard_normal((3, 100)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), 0.5 * x @ w.T + 2.0 * c, rtol=0.02, atol=0.02)


def test_openvino_target_writes_standard_blocked_dequantize_only() -> None:
    model, w = _matmul_model(120, 40, opset=17)
    out, res = apply_pass(
        "weightonly", model, options={**NO_TIMING, "rounding": "rtn"}, settings={"target": "openvino"}
    )
    assert res.changed
    assert all(n.domain in ("", "ai.onnx") for n in out.graph.node)
    assert {n.op_type for n in out.graph.node} == {"DequantizeLinear", "MatMul"}
    assert next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")) >= 21
    x = np.random.default_rng(6).standard_normal((2, 120)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion into MatMulNBits
    sess = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref_q = dequantize(quantize_rtn(w.astype(np.float64), 4, 32, clip_search=True))
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ ref_q, rtol=1e-4, atol=1e-4)


def test_gather_table_becomes_gather_block_quantized() -> None:
    table = np.random.default_rng(7).standard_normal((200, 64)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[2, 3] i) => (float[2, 3, 64] y) { y = Gather(T, i) }"""
    model = model_from_text(text, {"T": table})
    out, res = apply_pass("weightonly", model, options=NO_TIMING)
    assert res.changed and [n.op_type for n in out.graph.node] == ["GatherBlockQuantized"]
    idx = np.array([[0, 5, 199], [7, 7, 100]], dtype=np.int64)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"i": idx})[0]
    np.testing.assert_allclose(y, table[idx], atol=np.abs(table).max() / 7)
