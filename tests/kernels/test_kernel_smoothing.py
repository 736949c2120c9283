"""Smoothing kernels: the scales follow the SmoothQuant formula, the rewrite is exact in float and
flattens the activation's channel range."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.kernels.smoothing import apply_smoothing, channel_absmax, smoothing_scales


def _layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b


def test_scales_follow_the_formula_and_take_the_max_over_weights():
    act = np.array([4.0, 1.0, 0.0])
    w1 = np.array([[1.0, -2.0], [0.5, 0.1], [3.0, 0.0]])
    w2 = np.array([[0.5], [-1.0], [1.0]])
    s = smoothing_scales(act, [w1, w2], 0.5)
    np.testing.assert_allclose(s, [np.sqrt(4.0) / np.sqrt(2.0), 1.0 / 1.0, 1.0], rtol=1e-6)  # zero act: s = 1
    np.testing.assert_allclose(smoothing_scales(act, [w1], 1.0)[:2], [4.0, 1.0])
    np.testing.assert_allclose(smoothing_scales(act, [w1], 0.0)[:2], [1 / 2.0, 1 / 0.5])
    with pytest.raises(ValueError):
        smoothing_scales(act, [w1], 1.5)
    with pytest.raises(ValueError):
        smoothing_scales(act[:2], [w1], 0.5)


def test_channel_absmax_over_all_but_the_channel_axis():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 12
    np.testing.assert_allclose(channel_absmax(x), np.abs(x).reshape(-1, 4).max(0))
    np.testing.assert_allclose(channel_absmax(x, axis=1), np.abs(x).transpose(1, 0, 2).reshape(3, -1).max(1))


def test_smoothing_is_exact_in_float_and_flattens_outlier_channels():
    rng = np.random.default_rng(0)
    h = 16
    x = rng.standard_normal((2, 8, h)).astype(np.float32)
    g = np.where(np.arange(h) % 5 == 2, 20.0, 1.0).astype(np.float32)
    b = rng.standard_normal(h).astype(np.float32) * 0.1
    w = [rng.standard_normal((h, 12)).astype(np.float32) * 0.1 for _ in range(2)]
    ln = _layernorm(x, g, b)
    s = smoothing_scales(channel_absmax(ln), w, 0.5)
    g2, b2, w2 = apply_smoothing(g, b, w, s)
    ln2 = _layernorm(x, g2, b2)
    for a, a2 in zip(w, w2):
        np.testing.assert_allclose(ln @ a, ln2 @ a2, rtol=1e-4, atol=1e-5)
    spread = lambda t: channel_absmax(t).max() / channel_absmax(t).min()  # noqa: E731
    assert spread(ln2) < spread(ln) / 3
    assert apply_smoothing(g, None, w, s)[1] is None
