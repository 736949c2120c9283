"""Quantization arithmetic matching ONNX QuantizeLinear / DequantizeLinear.

Scales are float32 (as stored in the model) and never zero; rounding is half
to even and results saturate to the integer type, as the ONNX operators do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MIN_SCALE",
    "BIAS_MIN_SCALE",
    "BiasQuantizationError",
    "qrange",
    "scale_zero_point",
    "quantize",
    "dequantize",
    "quantize_weight_per_tensor",
    "quantize_weight_per_channel",
    "quantize_bias",
    "u8s8_saturates",
]

MIN_SCALE = 2.0**-40
"""Smallest scale handed out: ranges narrower than (qmax - qmin) * MIN_SCALE are widened."""

BIAS_MIN_SCALE = 1e-12
"""Bias scales (input scale * weight scale) below this are reported as unusable."""

_INT32_MAX = 2**31 - 1
_SUPPORTED = ("uint8", "int8", "uint16", "int16")


def _dtype(dtype: str | np.dtype | type) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in _SUPPORTED:
        raise ValueError(f"unsupported quantized type {dt.name}; use one of {_SUPPORTED}")
    return dt


def qrange(dtype: str | np.dtype = "uint8", symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range (qmin, qmax) used for a type.

    ``reduce_range`` drops one bit (uint8 -> [0, 127], int8 -> [-64, 63]);
    symmetric signed ranges are narrow ([-127, 127], [-63, 63]) so that the
    zero point is exactly 0 and +-absmax map to +-qmax.
    """
    info = np.iinfo(_dtype(dtype))
    qmin, qmax = int(info.min), int(info.max)
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def _safe_scale(raw: np.ndarray) -> np.ndarray:
    """float32 scales with exact-zero ranges mapped to 1.0 and tiny ones raised to MIN_SCALE."""
    raw = np.asarray(raw, dtype=np.float64)
    scale = np.where(raw == 0.0, 1.0, np.maximum(raw, MIN_SCALE))
    return scale.astype(np.float32)


def scale_zero_point(
    rmin: float,
    rmax: float,
    dtype: str = "uint8",
    symmetric: bool = False,
    reduce_range: bool = False,
) -> tuple[np.float32, np.integer]:
    """Scale (float32, never 0) and zero point (of ``dtype``) for a real range.

    The range is first widened to contain 0. Symmetric uses ±max(|rmin|, |rmax|)
    with zero point 0 for signed types and the mid-point (128 for uint8) for
    unsigned ones; asymmetric uses zp = round(qmin - rmin / scale).
    """
    dt = _dtype(dtype)
    qmin, qmax = qrange(dt, symmetric, reduce_range)
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        absmax = max(-rmin, rmax)
        rmin, rmax = -absmax, absmax
    scale = _safe_scale(np.array((rmax - rmin) / (qmax - qmin)))[()]
    if symmetric:
        zp = 0 if qmin < 0 else int(np.rint((qmin + qmax) / 2.0))
    else:
        zp = int(np.clip(np.rint(qmin - rmin / np.float64(scale)), qmin, qmax))
    return np.float32(scale), dt.type(zp)


def _along(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a 1-D per-axis parameter so it broadcasts along ``axis`` of an ndim-D tensor."""
    if axis is None or v.ndim == 0:
        return v
    if v.ndim != 1:
        raise ValueError("per-axis scale and zero point must be 1-D")
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray,
    dtype: str | np.dtype | type | None = None,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point).

    ``dtype`` defaults to the zero point's dtype (uint8 for a Python int).
    ``axis`` selects per-axis parameters (1-D scale and zero point). NaN maps
    to the zero point.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    zp_arr = np.asarray(zero_point)
    if dtype is None:
        dtype = zp_arr.dtype if zp_arr.dtype.name in _SUPPORTED else "uint8"
    dt = _dtype(dtype)
    s = _along(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    zp = _along(zp_arr.astype(np.float64), x.ndim, axis)
    info = np.iinfo(dt)
    y = np.rint(x / s).astype(np.float64) + zp
    y = np.where(np.isnan(y), zp, y)
    return np.clip(y, info.min, info.max).astype(dt)


def dequantize(
    q: np.ndarray,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray = 0,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, as float32."""
    q = np.asarray(q)
    s = _along(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    zp = _along(np.asarray(zero_point).astype(np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - zp).astype(np.float32) * s).astype(np.float32)


def _weight_qmax(bits: int, reduce_range: bool) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be in [2, 8], got {bits}")
    return 2 ** (bits - 2 if reduce_range else bits - 1) - 1


SLAB_ELEMENTS = 1 << 24
"""Weights are processed in slabs of about this many values along their first axis: rounding
needs float64 and absolute-value temporaries several times the slab's size, which for a 1 GB
weight taken whole came to 5 GB."""


def _slabs(shape: Sequence[int]) -> list[slice]:
    """Slices of the first axis covering `shape` in slabs of about SLAB_ELEMENTS values."""
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, SLAB_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


def all_finite(w: np.ndarray) -> bool:
    """True when `w` holds no inf/NaN; checked slab by slab, so a 1 GB weight needs no 1 GB mask."""
    w = np.asarray(w)
    if w.dtype.kind not in "fc":
        return True
    if w.ndim == 0:
        return bool(np.isfinite(w))
    return all(bool(np.isfinite(w[sl]).all()) for sl in _slabs(w.shape))


def _by_slab(shape: Sequence[int], fn) -> np.ndarray:
    """An int8 array of `shape` filled slab by slab: ``fn(slab)`` gives the values of ``[slab]``."""
    q = np.empty(tuple(shape), np.int8)
    for sl in _slabs(shape):
        q[sl] = fn(sl)
    return q


def quantize_weight_per_tensor(
    w: np.ndarray, bits: int = 8, reduce_range: bool = False
) -> tuple[np.ndarray, np.float32, np.int8]:
    """Symmetric per-tensor int8 weights: (q, scale, zero point 0).

    q lies in [-qmax, qmax] with qmax = 2**(bits-1) - 1 (127), or one bit less
    with ``reduce_range`` (63, inside the 7-bit range [-64, 63] that keeps
    u8s8 kernels without VNNI from saturating).
    """
    w = np.asarray(w)
    if w.ndim == 0:
        q1, scale1, zp1 = quantize_weight_per_tensor(w.reshape(1), bits, reduce_range)
        return q1.reshape(()), scale1, zp1
    qmax = _weight_qmax(bits, reduce_range)
    absmax = max((float(np.max(np.abs(w[sl]))) for sl in _slabs(w.shape) if w[sl].size), default=0.0)
    scale = _safe_scale(np.array(absmax / qmax))[()]
    q = _by_slab(w.shape, lambda sl: np.clip(quantize(w[sl], scale, np.int8(0), np.int8), -qmax, qmax))
    return q, np.float32(scale), np.int8(0)


def quantize_weight_per_channel(
    w: np.ndarray, axis: int, bits: int = 8, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 weights: (q, scales float32 [C], zero points int8 zeros [C]).

    One scale per index of ``axis`` (0 for Conv/Gemm-transposed weights, 1 for
    ConvTranspose and MatMul weights laid out [K, N]). Range as in
    :func:`quantize_weight_per_tensor`.
    """
    w = np.asarray(w)
    axis = axis % w.ndim
    qmax = _weight_qmax(bits, reduce_range)
    others = tuple(i for i in range(w.ndim) if i != axis)
    if not w.size:
        absmax = np.zeros(w.shape[axis])
    elif axis == 0:
        absmax = np.concatenate([np.max(np.abs(w[sl]), axis=others) for sl in _slabs(w.shape)]).astype(np.float64)
    else:
        absmax = np.max([np.max(np.abs(w[sl]), axis=others) for sl in _slabs(w.shape)], axis=0).astype(np.float64)
    scales = _safe_scale(absmax / qmax)
    zps = np.zeros(w.shape[axis], dtype=np.int8)

    def rows(sl: slice) -> np.ndarray:
        s, z = (scales[sl], zps[sl]) if axis == 0 else (scales, zps)
        return np.clip(quantize(w[sl], s, z, np.int8, axis=axis), -qmax, qmax)

    return _by_slab(w.shape, rows), scales, zps


def block_layout(shape: Sequence[int], axis: int, block: int) -> tuple[tuple[int, ...], int] | None:
    """How to cut a weight into blocks of `block` values along its reduction: (blocked shape,
    reduced axis), or None when the layout does not allow it.

    Output channels first (Conv, Gemm transB=1: [O, ...] -> [O, R/block, block], reduced axis 2);
    output channels last on a matrix (MatMul, Gemm transB=0: [K, N] -> [K/block, block, N],
    reduced axis 1). The reduction must be a multiple of `block`; `block` is halved (down to 16)
    until it divides the reduction.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or axis % len(shape) not in (0, 1) or (axis % len(shape) == 1 and len(shape) != 2):
        return None
    first = axis % len(shape) == 0
    r = int(np.prod(shape[1:])) if first else shape[0]
    while block > 16 and r % block:
        block //= 2
    if r % block or r <= block:
        return None
    return ((shape[0], r // block, block), 2) if first else ((r // block, block, shape[1]), 1)


def quantize_weight_blocks(w: np.ndarray, axis: int, block: int = 32) -> tuple[np.ndarray, np.ndarray] | None:
    """Symmetric int8 weights with one scale per `block` consecutive values of each output
    channel's reduction (see `block_layout`): (q in the blocked shape, float32 scales that
    broadcast against it), or None when the weight cannot be cut so.

    Finer than per-channel: one outlier only widens the step of its own block (on PP-OCRv4 rec
    a 480x480 1x1 conv goes from 30.5 to 41.3 dB weight SQNR with blocks of 32).
    """
    layout = block_layout(np.shape(w), axis, block)
    if layout is None:
        return None
    shape, reduced = layout
    b = np.asarray(w).reshape(shape)
    absmax = np.concatenate([np.max(np.abs(b[sl]), axis=reduced, keepdims=True) for sl in _slabs(shape)])
    scales = _safe_scale(absmax.astype(np.float64) / 127)
    q = _by_slab(shape, lambda sl: np.clip(np.rint(b[sl] / scales[sl]), -127, 127))
    return q, scales


class BiasQuantizationError(ValueError):
    """The int32 bias cannot represent the float bias: the scale is too small or |b/scale| overflows.

    ``channels`` lists the offending bias indices; callers usually keep the
    float bias (or widen the weight scale) for that layer.
    """

    def __init__(self, message: str, channels: Sequence[int]) -> None:
        super().__init__(message)
        self.channels = list(channels)


def quantize_bias(
    b: np.ndarray, input_scale: float | np.floating, weight_scales: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale = input_scale * weight_scales (float32, per tensor or per channel).

    Returns (q int32 [C], scale float32 with the shape of ``weight_scales``).
    Raises :class:`BiasQuantizationError` (a ValueError) when some scale is
    below BIAS_MIN_SCALE or some |b / scale| exceeds 2**31 - 1.
    """
    b64 = np.asarray(b, dtype=np.float64)
    scale = (np.float32(input_scale) * np.asarray(weight_scales, dtype=np.float32)).astype(np.float32)
    s64 = np.broadcast_to(scale.astype(np.float64), b64.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(s64 > 0, b64 / np.where(s64 > 0, s64, 1.0), np.inf)
    bad = (s64 < BIAS_MIN_SCALE) | ~(np.abs(np.rint(ratio)) <= _INT32_MAX)
    if np.any(bad):
        channels = np.flatnonzero(bad.reshape(-1)).tolist()
        raise BiasQuantizationError(
            f"bias not representable in int32 at {len(channels)} channel(s) "
            f"(first {channels[:8]}): scale too small or |bias/scale| > 2**31-1",
            channels,
        )
    return np.rint(ratio).astype(np.int32), scale


def u8s8_saturates(
    w_q: np.ndarray, reduction_axis: int | Sequence[int], x_max: int = 255, aligned: bool = False
) -> bool:
    """Whether a u8 x s8 layer can saturate the int16 pair sums of AVX2 ``vpmaddubsw``.

    Without VNNI, x86 kernels multiply uint8 activations by int8 weights and
    add adjacent products into a saturating int16. For weights a, b adjacent
    along the reduction order and activations in [0, x_max], the pair sum spans
    [x_max * (min(a,0) + min(b,0)), x_max * (max(a,0) + max(b,0))]; saturation
    is possible if that leaves [-32768, 32767]. The reduction order is
    ``reduction_axis`` (an axis, or several axes flattened in the given order,
    e.g. (1, 2, 3) for Conv [M, C, kh, kw]). Packing order inside a real
    kernel is not known here, so by default every adjacent pair is checked
    (conservative); ``aligned`` checks only pairs (0,1), (2,3), ...
    """
    w = np.asarray(w_q)
    axes = [reduction_axis] if isinstance(reduction_axis, (int, np.integer)) else list(reduction_axis)
    axes = [a % w.ndim for a in axes]
    rest = [a for a in range(w.ndim) if a not in axes]
    mat = np.transpose(w, rest + axes).reshape(int(np.prod([w.shape[a] for a in rest])), -1)
    for sl in _slabs(mat.shape):  # widened per slab: int32 of a whole big weight is 4x its size
        m = mat[sl].astype(np.int32)
        if m.shape[1] < 2:
            pos, neg = np.maximum(m, 0), np.minimum(m, 0)
        else:
            step = 2 if aligned else 1
            left, right = m[:, 0:-1:step], m[:, 1::step]
            pos = np.maximum(left, 0) + np.maximum(right, 0)
            neg = np.minimum(left, 0) + np.minimum(right, 0)
        if pos.size and (x_max * int(pos.max()) > 32767 or x_max * int(neg.min()) < -32768):
            return True
    return False
