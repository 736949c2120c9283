"""GPTQ: block quantization of a weight with error feedback through the input's second moment.

For y = x W (W: K x N) and inputs of second moment H = E[x^T x], GPTQ (Frantar
et al., 2022) quantizes the rows of W one at a time and moves each row's
rounding error onto the rows not yet quantized, in the direction that H says
costs least output error: with U the upper Cholesky factor of H^-1,
W[j:] -= U[i, j:]^T (w_i - q_i) / U[i, i]. The scale and zero point of each
block of rows are fitted on that block's rows as they stand when the block is
reached (the error fed forward included; a batch of rows holds whole blocks), so the result is an ordinary block
quantization (`onnxopt.kernels.blockquant.BlockQuant`) that MatMulNBits and a
blocked DequantizeLinear read unchanged. Updates are applied lazily in batches
of rows, as the reference implementation does.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from onnxopt.kernels.blockquant import BlockQuant, block_params, fit_block, quantize_with

__all__ = ["gptq_quantize", "inverse_cholesky"]


def inverse_cholesky(H: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of (H + d I)^-1, mask of dead input channels), d = damp * mean diagonal;
    a channel never active (zero diagonal) gets a unit diagonal (its rows of W do not matter)."""
    H = 0.5 * (np.asarray(H, dtype=np.float64) + np.asarray(H, dtype=np.float64).T)
    dead = np.diag(H) <= 0
    H = H.copy()
    H[dead, dead] = 1.0
    d = damp * float(np.mean(np.diag(H)))
    for _ in range(8):
        try:
            L = scipy.linalg.cholesky(H + d * np.eye(H.shape[0]), lower=True)
            Linv = scipy.linalg.solve_triangular(L, np.eye(H.shape[0]), lower=True)
            Hinv = Linv.T @ Linv
            return scipy.linalg.cholesky(Hinv, lower=False), dead
        except np.linalg.LinAlgError:
            d = max(d * 10.0, 1e-8)
    raise np.linalg.LinAlgError("input second moment is not positive definite even after damping")


def gptq_quantize(
    W: np.ndarray, H: np.ndarray, bits: int, block: int, damp: float = 0.01, clip_search: bool = True, batch: int = 128
) -> BlockQuant:
    """GPTQ block quantization of W (K x N) for inputs of second moment H (K x K)."""
    W = np.array(W, dtype=np.float64)
    K, N = W.shape
    U, dead = inverse_cholesky(H, damp)
    W[dead] = 0.0
    kb = -(-K // block)
    q = np.zeros((K, N), dtype=np.uint8)
    scales = np.zeros((kb, N), dtype=np.float32)
    zps = np.zeros((kb, N), dtype=np.uint8)
    batch = block * max(1, batch // block)  # a block never straddles two batches
    scale = zp = None
    for i1 in range(0, K, batch):
        i2 = min(i1 + batch, K)
        Wb = W[i1:i2].copy()
        Err = np.zeros_like(Wb)
        for i in range(i1, i2):
            if i % block == 0:
                rows = Wb[i - i1 : i - i1 + block]
                scale, zp = fit_block(rows, bits) if clip_search else block_params(rows, bits)
                scales[i // block], zps[i // block] = scale, zp
            assert scale is not None and zp is not None
            w = Wb[i - i1]
            code, deq = quantize_with(w[None, :], scale, zp, bits)
            q[i] = code[0]
            e = (w - deq[0]) / U[i, i]
            Wb[i - i1 + 1 :] -= np.outer(U[i, i + 1 : i2], e)
            Err[i - i1] = e
        W[i2:] -= U[i1:i2, i2:].T @ Err
    return BlockQuant(q, scales, zps, bits, block)
