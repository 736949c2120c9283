"""Numerics of operator fusion: folding affine per-channel transforms into weights and biases.

All functions take and return numpy arrays; float64 is used internally so a
fused weight is as close to the unfused computation as float32 allows.
"""

from __future__ import annotations

import numpy as np


def bn_affine(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as y = x * a + c per channel; returns (a, c) in float64."""
    a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    c = bias.astype(np.float64) - mean.astype(np.float64) * a
    return a, c


def scale_output_channels(w: np.ndarray, a: np.ndarray, axis: int, groups: int = 1) -> np.ndarray:
    """Multiply output channel k of weight `w` by a[k].

    `axis` is the weight axis holding output channels within a group: 0 for Conv
    and Gemm with transB, 1 for ConvTranspose (whose output channel of group g and
    local index j is g * (C_out / groups) + j, the weight's input axis being split
    into the groups) and for MatMul/Gemm weights [K, N].
    """
    factors = a.astype(w.dtype)  # one output-sized array, whatever the weight's size (no float64 copy)
    if axis == 0 or groups == 1:
        shape = [1] * w.ndim
        shape[axis] = -1
        return w * factors.reshape(shape)
    cin, per_group = w.shape[0], w.shape[1]
    grouped = np.repeat(factors.reshape(groups, per_group), cin // groups, axis=0)  # [cin, per_group]
    return w * grouped.reshape(cin, per_group, *([1] * (w.ndim - 2)))


def affine_bias(b: np.ndarray | None, a: np.ndarray, c: np.ndarray, channels: int, dtype: np.dtype) -> np.ndarray:
    """New bias after y -> y * a + c, for an op whose old bias is `b` (None means zero)."""
    old = np.zeros(channels, np.float64) if b is None else np.broadcast_to(b.astype(np.float64), (channels,))
    return (old * a + c).astype(dtype)


def per_channel(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """`value` as a length-`channels` vector if it broadcasts along `axis` only of a rank-`rank` tensor.

    Returns None when the constant varies along any other axis (then it is not a
    per-channel transform and cannot be folded into weights).
    """
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    for i, d in enumerate(shape):
        if i != axis and d != 1:
            return None
    if shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1) if value.size > 1 else value.reshape(1), (channels,)).astype(np.float64)
