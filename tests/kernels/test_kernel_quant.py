"""Quantization arithmetic: ONNX semantics, per-channel axes, bias, u8s8 saturation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxopt.kernels import quant as quant_kernels
from onnxopt.kernels.quant import (
    BiasQuantizationError,
    block_layout,
    dequantize,
    qrange,
    quantize,
    quantize_bias,
    quantize_weight_blocks,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
    scale_zero_point,
    u8s8_saturates,
)

finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(a=finite, b=finite, dtype=st.sampled_from(["uint8", "int8"]), symmetric=st.booleans(), reduce=st.booleans())
def test_zero_is_exact_and_round_trip_error_is_half_scale(a, b, dtype, symmetric, reduce):
    rmin, rmax = min(a, b), max(a, b)
    scale, zp = scale_zero_point(rmin, rmax, dtype, symmetric, reduce)
    assert isinstance(scale, np.float32) and scale > 0 and np.isfinite(scale)
    assert zp.dtype == np.dtype(dtype)
    assert dequantize(quantize(np.float32(0.0), scale, zp), scale, zp) == 0.0
    qmin, qmax = qrange(dtype, symmetric, reduce)
    assert qmin <= int(zp) <= qmax
    lo, hi = min(rmin, 0.0), max(rmax, 0.0)
    x = np.linspace(lo, hi, 257).astype(np.float32)
    q = quantize(x, scale, zp)
    err = np.abs(dequantize(q, scale, zp).astype(np.float64) - x)
    exact_fit = not (symmetric and dtype == "uint8")
    if exact_fit:
        assert err.max() <= scale / 2 * (1 + 1e-4) + 1e-6 * max(abs(lo), abs(hi))


def test_scale_zero_point_known_values():
    s, zp = scale_zero_point(-1.0, 3.0, "uint8")
    assert s == np.float32(4.0 / 255) and zp == 64
    s, zp = scale_zero_point(-1.0, 3.0, "int8", symmetric=True)
    assert s == np.float32(6.0 / 254) and zp == 0
    s, zp = scale_zero_point(-1.0, 1.0, "uint8", symmetric=True)
    assert zp == 128
    assert qrange("uint8", reduce_range=True) == (0, 127)
    assert qrange("int8", reduce_range=True) == (-64, 63)
    assert qrange("int8", symmetric=True) == (-127, 127)


def test_scale_is_never_zero():
    for lo, hi in ((0.0, 0.0), (-1e-30, 1e-30), (0.0, 1e-45), (5.0, 5.0)):
        s, zp = scale_zero_point(lo, hi, "int8")
        assert s > 0 and np.isfinite(1.0 / s)
        assert dequantize(quantize(0.0, s, zp), s, zp) == 0.0


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, 1.0, np.int8(0)), [0, 2, 2, 0, -2, 127, -128])
    np.testing.assert_array_equal(quantize(x, 1.0, np.uint8(10)), [10, 12, 12, 10, 8, 255, 0])
    assert quantize(np.array([np.nan]), 1.0, np.uint8(7))[0] == 7
    assert quantize(np.array([3.0]), 1.0, 0).dtype == np.uint8


def test_per_axis_quantize_matches_per_slice():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    scales = np.array([0.01, 0.02, 0.05], dtype=np.float32)
    zps = np.array([0, 3, -2], dtype=np.int8)
    q = quantize(x, scales, zps, axis=1)
    for c in range(3):
        np.testing.assert_array_equal(q[:, c], quantize(x[:, c], scales[c], zps[c]))
    deq = dequantize(q, scales, zps, axis=1)
    for c in range(3):
        np.testing.assert_array_equal(deq[:, c], dequantize(q[:, c], scales[c], zps[c]))


def _channel_scaled(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    mags = 10.0 ** np.arange(shape[axis], dtype=np.float32) / 100
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    return w * mags.reshape(bshape)


@pytest.mark.parametrize(
    "shape,axis", [((8, 3, 3, 3), 0), ((4, 6, 3, 3), 1), ((16, 5), -1)], ids=["conv", "conv_transpose", "matmul_KN"]
)
def test_per_channel_weights(shape, axis):
    w = _channel_scaled(shape, axis)
    q, scales, zps = quantize_weight_per_channel(w, axis)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and zps.dtype == np.int8
    assert scales.shape == zps.shape == (shape[axis],) and not zps.any()
    moved = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
    np.testing.assert_allclose(scales, np.abs(moved).max(axis=1) / 127, rtol=1e-6)
    assert np.all(np.abs(np.moveaxis(q, axis, 0).reshape(shape[axis], -1)).max(axis=1) == 127)
    err = np.moveaxis(np.abs(dequantize(q, scales, zps, axis=axis) - w), axis, 0).reshape(shape[axis], -1)
    assert np.all(err <= scales[:, None] / 2 * (1 + 1e-5))


def test_per_channel_zero_channel_and_reduce_range():
    w = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    w[2] = 0
    q, scales, _ = quantize_weight_per_channel(w, 0, reduce_range=True)
    assert scales[2] > 0 and not q[2].any()
    assert q.min() >= -64 and q.max() <= 63 and np.abs(q).max() == 63
    q4, s4, _ = quantize_weight_per_channel(w, 0, bits=4)
    assert np.abs(q4).max() == 7


def test_per_tensor_weights():
    w = np.array([[-2.0, 1.0], [0.5, 0.0]], dtype=np.float32)
    q, s, zp = quantize_weight_per_tensor(w)
    assert s == np.float32(2.0 / 127) and zp == 0
    np.testing.assert_array_equal(q, [[-127, 64], [32, 0]])


def test_bias_quantization():
    rng = np.random.default_rng(2)
    b = rng.standard_normal(6).astype(np.float32)
    sw = np.abs(rng.standard_normal(6)).astype(np.float32) / 100 + 1e-3
    q, s = quantize_bias(b, 0.02, sw)
    assert q.dtype == np.int32 and s.dtype == np.float32 and s.shape == (6,)
    np.testing.assert_array_equal(s, np.float32(0.02) * sw)
    assert np.all(np.abs(q * s.astype(np.float64) - b) <= s / 2 * (1 + 1e-6))
    q1, s1 = quantize_bias(b, 0.02, np.float32(0.01))
    assert s1.shape == () and np.all(np.abs(q1 * float(s1) - b) <= float(s1) / 2 * (1 + 1e-6))


def test_bias_overflow_and_tiny_scale_are_reported():
    b = np.array([1.0, 1e6, 0.0])
    with pytest.raises(BiasQuantizationError) as info:
        quantize_bias(b, 1e-3, np.array([1e-3, 1e-3, 1e-3]))
    assert info.value.channels == [1]
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):
        quantize_bias(np.array([0.0, 0.0]), 1e-7, np.array([1e-7, 1.0]))


def test_u8s8_saturation_detection():
    assert u8s8_saturates(np.array([[127, 127]], dtype=np.int8), 1)
    assert not u8s8_saturates(np.array([[64, 64]], dtype=np.int8), 1)
    assert not u8s8_saturates(np.array([[127, -127, 127, -127]], dtype=np.int8), 1)
    assert u8s8_saturates(np.array([[-128, -128]], dtype=np.int8), 1)
    assert u8s8_saturates(np.array([[0, 127, 127, 0]], dtype=np.int8), 1)
    assert not u8s8_saturates(np.array([[0, 127, 127, 0]], dtype=np.int8), 1, aligned=True)
    assert not u8s8_saturates(np.array([[127, 0], [127, 0]], dtype=np.int8), 1)
    assert u8s8_saturates(np.array([[127, 0], [127, 0]], dtype=np.int8), 0)


def test_reduce_range_weights_never_saturate_but_full_range_can():
    w = _channel_scaled((8, 4, 3, 3), 0, seed=3)
    w[:, :, :, :] = np.abs(w)
    q7, _, _ = quantize_weight_per_channel(w, 0, reduce_range=True)
    q8, _, _ = quantize_weight_per_channel(w, 0)
    assert not u8s8_saturates(q7, (1, 2, 3))
    assert u8s8_saturates(q8, (1, 2, 3))
    assert not u8s8_saturates(np.full((3, 5), -64, dtype=np.int8), 1)


@pytest.mark.parametrize(
    "shape,axis,layout",
    [
        ((480, 240, 1, 1), 0, ((480, 15, 16), 2)),  # 240 is not a multiple of 32: blocks of 16
        ((64, 32, 3, 3), 0, ((64, 9, 32), 2)),
        ((256, 96), 1, ((8, 32, 96), 1)),  # MatMul [K, N]: blocks along K
        ((120, 6625), 1, None),  # 120 = 8 * 15: blocks of 8 would cost more than they save
        ((16, 1, 3, 3), 0, None),  # reduction of 9
        ((4, 5, 3, 3), 1, None),  # ConvTranspose layout
        ((64,), 0, None),
    ],
)
def test_block_layout(shape, axis, layout):
    assert block_layout(shape, axis, 32) == layout


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 4), st.sampled_from([0, 1]), st.integers(0, 2**31 - 1))
def test_block_weights_round_trip_within_half_a_step_and_beat_per_channel(o, k, axis, seed):
    rng = np.random.default_rng(seed)
    shape = (o * 8, 32 * k) if axis == 0 else (32 * k, o * 8)
    w = rng.standard_normal(shape).astype(np.float32)
    w.flat[rng.integers(w.size)] *= 20  # an outlier widens only its own block's step
    q, s = quantize_weight_blocks(w, axis, 32)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    back = (q.astype(np.float32) * s).reshape(shape)
    step = np.broadcast_to(s, q.shape).reshape(shape)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    qc, sc, _ = quantize_weight_per_channel(w, axis)
    per_channel = dequantize(qc, sc, 0, axis=axis)
    assert np.sum((back - w) ** 2) <= np.sum((per_channel - w) ** 2) + 1e-9


@pytest.mark.parametrize("shape,axis", [((70, 9), 0), ((70, 9), 1), ((33, 4, 3, 3), 0), ((64, 40), 1), ((5,), 0)])
def test_weights_quantized_in_slabs_equal_whole(monkeypatch, shape, axis):
    """Big weights are processed a slab of rows at a time; any slab size gives the same bits."""
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 3
    w.reshape(-1)[3] = 40.0  # one outlier: its slab alone sees it
    whole = (
        quantize_weight_per_tensor(w),
        quantize_weight_per_channel(w, axis),
        quantize_weight_per_channel(w, axis, reduce_range=True),
        quantize_weight_blocks(w, axis, 16),
        u8s8_saturates(quantize_weight_per_channel(w, axis)[0], [a for a in range(w.ndim) if a != axis]),
    )
    monkeypatch.setattr(quant_kernels, "SLAB_ELEMENTS", 7)
    sliced = (
        quantize_weight_per_tensor(w),
        quantize_weight_per_channel(w, axis),
        quantize_weight_per_channel(w, axis, reduce_range=True),
        quantize_weight_blocks(w, axis, 16),
        u8s8_saturates(quantize_weight_per_channel(w, axis)[0], [a for a in range(w.ndim) if a != axis]),
    )
    for a, b in zip(whole[:4], sliced[:4]):
        if a is None:
            assert b is None
            continue
        for x, y in zip(a, b):
            assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
    assert whole[4] == sliced[4]
