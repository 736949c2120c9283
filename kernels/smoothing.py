"""SmoothQuant-style smoothing: move activation outliers into the weights, exactly in float.

A MatMul y = x W whose input x has a few channels j of large magnitude (LayerNormalization
outputs of trained transformers) loses those channels' small neighbours to one per-tensor
activation scale. Dividing channel j of x by s_j and multiplying row j of W by s_j leaves
y unchanged in float while flattening x's range (Xiao et al., "SmoothQuant", 2023):

    s_j = max|X_j|^a / max|W_j|^(1 - a)

with strength a in [0, 1] (0: nothing moved into the activations' favour, 1: every outlier
moved into the weights). When x is a LayerNormalization output, the division folds into its
gamma and beta, so it costs nothing per run. Several weights reading the same x (Q, K, V)
share one s: max|W_j| is taken over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["apply_smoothing", "channel_absmax", "smoothing_scales"]

#: Channels whose activation or weight maximum is below this are left unscaled (s = 1).
_TINY = 1e-8


def channel_absmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """max |x| over every axis but `axis` (float64), one value per channel of `axis`."""
    x = np.asarray(x)
    axis = axis % x.ndim
    others = tuple(i for i in range(x.ndim) if i != axis)
    return np.abs(x).max(axis=others).astype(np.float64) if others else np.abs(x).astype(np.float64)


def smoothing_scales(act_absmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """Per-input-channel scales s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (float32), with
    max|W_j| the largest |value| of row j over every weight in `weights` (each [in, out]).
    A channel with a (near) zero activation or weight maximum keeps s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    a = np.asarray(act_absmax, np.float64)
    w = np.max([np.abs(np.asarray(m, np.float64)).max(axis=1) for m in weights], axis=0)
    if w.shape != a.shape:
        raise ValueError(f"weights have {w.shape[0]} input rows, activations {a.shape[0]} channels")
    ok = (a > _TINY) & (w > _TINY)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s.astype(np.float32)


def apply_smoothing(
    gamma: np.ndarray, beta: np.ndarray | None, weights: Sequence[np.ndarray], s: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """(gamma / s, beta / s, each weight with row j times s_j): the LayerNormalization output
    divided by s per channel and every MatMul reading it unchanged in float."""
    s = np.asarray(s, np.float32)
    g = (np.asarray(gamma, np.float32) / s).astype(np.float32)
    b = None if beta is None else (np.asarray(beta, np.float32) / s).astype(np.float32)
    return g, b, [(np.asarray(w, np.float32) * s[:, None]).astype(np.float32) for w in weights]
