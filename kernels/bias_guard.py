"""Widening weight scales so an int32 bias stays representable (bias scale = s_x * s_w).

Channels whose weights are tiny (or all zero) get tiny weight scales; with a
large bias, |b / (s_x * s_w)| then overflows int32. Raising that channel's
weight scale to the smallest one that fits costs only precision of weights
that are near zero anyway, and keeps the layer quantizable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bias_safe_weight_scales"]

_INT32_LIMIT = 2.0**31 - 1


def bias_safe_weight_scales(
    weight_scales: np.ndarray, bias: np.ndarray, input_scale: float, min_bias_scale: float = 1e-12, margin: float = 2.0
) -> np.ndarray:
    """Weight scales (float32, same shape) raised where the int32 bias would overflow or underflow.

    Per channel the scale becomes at least ``margin * max(|b| / (s_x * (2**31-1)), min_bias_scale / s_x)``;
    a per-tensor scale (0-d) takes the largest requirement over all channels.
    """
    s = np.asarray(weight_scales, dtype=np.float64)
    b = np.abs(np.asarray(bias, dtype=np.float64))
    need = margin * np.maximum(b / (float(input_scale) * _INT32_LIMIT), min_bias_scale / float(input_scale))
    if s.ndim == 0:
        return np.float32(max(float(s), float(need.max(initial=0.0))))
    return np.maximum(s, need).astype(np.float32)
