"""Block-wise asymmetric weight quantization (4 or 8 bits) and the layouts onnxruntime reads.

A weight W (K x N, as MatMul reads it: K input rows, N output columns) is split
along K into blocks of `block` rows; each (block, column) has its own scale and
integer zero point, so the code of W[k, n] is clip(round(W[k, n] / s + z), 0,
2^bits - 1) and it dequantizes to (q - z) * s. The range of a block always
includes 0 (as onnxruntime's own quantizer does), so the zero point is a code.

Two layouts are written from the same codes:

- `pack_matmul_nbits`: com.microsoft MatMulNBits' B [N, K/block, block*bits/8]
  (K padded up to whole blocks, two 4-bit codes per byte, low nibble first),
  scales [N, K/block] and zero points [N, ceil(K/block * bits / 8)] (packed the
  same way);
- the codes themselves (K x N) with scales and zero points (K/block x N), which
  is the standard DequantizeLinear's blocked layout (axis 0, `block_size`).

Also here: the output error of a quantized weight under an input second moment
H = E[x^T x] and the AWQ-style search for per-input-channel scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BlockQuant",
    "awq_search",
    "block_params",
    "dequantize",
    "fit_block",
    "gather_layout",
    "output_error",
    "pack_matmul_nbits",
    "quantize_rtn",
    "quantize_with",
    "unpack_matmul_nbits",
]

#: The smallest scale handed out (a block of zeros gets it, its codes all equal the zero point).
_TINY = 1e-12


@dataclass
class BlockQuant:
    """Codes of a K x N weight and the per-(block, column) scales and zero points."""

    q: np.ndarray  # uint8 codes, K x N
    scales: np.ndarray  # float32, ceil(K / block) x N
    zero_points: np.ndarray  # uint8, ceil(K / block) x N
    bits: int
    block: int

    @property
    def k(self) -> int:
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        return int(self.q.shape[1])

    @property
    def k_blocks(self) -> int:
        return int(self.scales.shape[0])


def block_params(w: np.ndarray, bits: int, shrink: float | np.ndarray = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one block of rows `w` (rows x N) per column, its range (0 included)
    optionally shrunk by `shrink` (clipping the extremes)."""
    qmax = (1 << bits) - 1
    lo = np.minimum(w.min(axis=0), 0.0) * shrink
    hi = np.maximum(w.max(axis=0), 0.0) * shrink
    scale = np.maximum((hi - lo) / qmax, _TINY)
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    return scale.astype(np.float32), zp.astype(np.uint8)


def _codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes of rows `w` with one (scale, zero point) per column."""
    q = np.round(w / scale.astype(np.float64)) + zp
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def quantize_with(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, dequantized values) of rows `w` (rows x N) under one (scale, zero point) per column."""
    q = _codes(w, scale, zp, bits)
    return q, (q.astype(np.float64) - zp) * scale


def quantize_rtn(W: np.ndarray, bits: int, block: int, clip_search: bool = False) -> BlockQuant:
    """Round-to-nearest block quantization of W (K x N). With `clip_search`, each (block, column)
    takes the range shrink among 1.0 .. 0.75 that minimizes its squared rounding error."""
    W = np.asarray(W, dtype=np.float64)
    K, N = W.shape
    kb = -(-K // block)
    q = np.zeros((K, N), dtype=np.uint8)
    scales = np.zeros((kb, N), dtype=np.float32)
    zps = np.zeros((kb, N), dtype=np.uint8)
    for b in range(kb):
        rows = W[b * block : (b + 1) * block]
        s, z = fit_block(rows, bits) if clip_search else block_params(rows, bits)
        q[b * block : (b + 1) * block] = _codes(rows, s, z, bits)
        scales[b], zps[b] = s, z
    return BlockQuant(q, scales, zps, bits, block)


def fit_block(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a block of rows, the (scale, zero point) of the range shrink (1.0 down to 0.75)
    with least squared error."""
    best_s, best_z = block_params(rows, bits)
    best_err = np.sum((quantize_with(rows, best_s, best_z, bits)[1] - rows) ** 2, axis=0)
    for shrink in np.linspace(0.975, 0.75, 10):
        s, z = block_params(rows, bits, shrink)
        err = np.sum((quantize_with(rows, s, z, bits)[1] - rows) ** 2, axis=0)
        better = err < best_err
        best_s, best_z, best_err = np.where(better, s, best_s), np.where(better, z, best_z), np.minimum(err, best_err)
    return best_s, best_z


def dequantize(bq: BlockQuant) -> np.ndarray:
    """The K x N float64 weight the codes stand for."""
    rows = np.arange(bq.k) // bq.block
    return (bq.q.astype(np.float64) - bq.zero_points[rows]) * bq.scales[rows].astype(np.float64)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 codes into bytes: 8 bits as they are, 4 bits two per byte (low nibble first)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def _unpack_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `_pack_rows`, keeping the first `count` codes of the last axis."""
    if bits == 8:
        return packed[..., :count].astype(np.uint8)
    out = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :count].astype(np.uint8)


def pack_matmul_nbits(bq: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, scales, zero_points) as com.microsoft MatMulNBits reads them: B uint8
    [N, k_blocks, block * bits / 8] with K padded by the zero point's code (a padded row
    dequantizes to 0), scales [N, k_blocks] float32, zero points uint8 [N, ceil(k_blocks * bits / 8)]."""
    kb, pad = bq.k_blocks, bq.k_blocks * bq.block - bq.k
    codes = bq.q.T  # N x K
    if pad:
        codes = np.concatenate([codes, np.repeat(bq.zero_points[-1][:, None], pad, axis=1)], axis=1)
    B = _pack_rows(codes.reshape(bq.n, kb, bq.block), bq.bits)
    zp = _pack_rows(np.ascontiguousarray(bq.zero_points.T), bq.bits)
    return np.ascontiguousarray(B), np.ascontiguousarray(bq.scales.T), np.ascontiguousarray(zp)


def unpack_matmul_nbits(
    B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int, bits: int, block: int
) -> BlockQuant:
    """The codes, scales and zero points a MatMulNBits weight holds (the inverse of `pack_matmul_nbits`)."""
    n, kb = B.shape[0], B.shape[1]
    codes = _unpack_rows(B, bits, block).reshape(n, kb * block)[:, :k]
    zps = _unpack_rows(zero_points, bits, kb)
    return BlockQuant(
        np.ascontiguousarray(codes.T), np.ascontiguousarray(scales.T), np.ascontiguousarray(zps.T), bits, block
    )


def gather_layout(table: np.ndarray, bits: int, block: int, clip_search: bool = True) -> BlockQuant:
    """Block quantization of an embedding table (rows x D) along D, as GatherBlockQuantized and a
    DequantizeLinear on axis 1 read it: the returned codes are D x rows (transpose them back)."""
    return quantize_rtn(np.asarray(table, dtype=np.float64).T, bits, block, clip_search)


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray | None) -> float:
    """Relative output error sqrt(tr(dW^T H dW) / tr(W^T H W)) of using W_hat for W under inputs of
    second moment H (the identity, i.e. the weight's own relative error, when H is None)."""
    dW = np.asarray(W_hat, dtype=np.float64) - W
    if H is None:
        num, den = float(np.sum(dW * dW)), float(np.sum(np.asarray(W, dtype=np.float64) ** 2))
    else:
        num, den = float(np.sum(dW * (H @ dW))), float(np.sum(W * (H @ W)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def awq_search(
    W: np.ndarray, H: np.ndarray, bits: int, block: int, grid: int = 11
) -> tuple[np.ndarray, BlockQuant, float]:
    """AWQ-style per-input-channel scales: s = m^a / mean(m^a) with m the rms of each input channel
    (from H's diagonal), a on a grid over [0, 1]; W is quantized as diag(s) W (the input is then
    divided by s), and the a whose output error under H is least wins (a = 0 is plain RTN).
    Returns (s, the codes of diag(s) W, the relative output error)."""
    W = np.asarray(W, dtype=np.float64)
    m = np.sqrt(np.maximum(np.diag(H), 0.0))
    m = np.where(m > 0, m, m[m > 0].min() if np.any(m > 0) else 1.0)
    best: tuple[np.ndarray, BlockQuant, float] | None = None
    for a in np.linspace(0.0, 1.0, grid):
        s = m**a
        s = s / np.exp(np.mean(np.log(s)))
        bq = quantize_rtn(W * s[:, None], bits, block, clip_search=True)
        err = output_error(W, dequantize(bq) / s[:, None], H)
        if best is None or err < best[2]:
            best = (s, bq, err)
    assert best is not None
    return best
