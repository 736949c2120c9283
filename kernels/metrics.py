"""Metrics comparing a candidate output with a reference output.

All arithmetic is in float64. The single-metric functions return Python
floats, which may be inf or NaN (NaN inputs propagate; count them with
:func:`nan_inf_count`). :func:`compare` makes its dict strictly
JSON-serializable: +inf and -inf become the strings ``"inf"`` and ``"-inf"``,
NaN becomes ``None``, and metrics that do not apply (top-k of a scalar) are
``None`` as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "max_abs_error",
    "mean_abs_error",
    "cosine",
    "sqnr_db",
    "topk_agreement",
    "nan_inf_count",
    "nonfinite_mismatch",
    "finite_pair",
    "class_axis",
    "distribution_rows",
    "compare",
]


def _pair(ref: Any, cand: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"shape mismatch: reference {r.shape} vs candidate {c.shape}")
    return r, c


def max_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """max |cand - ref| (0.0 for empty arrays)."""
    r, c = _pair(ref, cand)
    return float(np.max(np.abs(c - r))) if r.size else 0.0


def mean_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """mean |cand - ref| (0.0 for empty arrays)."""
    r, c = _pair(ref, cand)
    return float(np.mean(np.abs(c - r))) if r.size else 0.0


def cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays: 1.0 when both are all zero, 0.0 when only one is.

    Reduced with `np.sum` (fixed pairwise order, no BLAS threads), so the value is the
    same on every machine and thread count: results merged from workers equal a
    single-process run bit for bit.
    """
    r, c = _pair(ref, cand)
    r, c = r.ravel(), c.ravel()
    # scale first so squares of large or tiny values neither overflow nor underflow
    r_scale, c_scale = np.max(np.abs(r), initial=0.0), np.max(np.abs(c), initial=0.0)
    if r_scale == 0 and c_scale == 0:
        return 1.0
    if r_scale == 0 or c_scale == 0:
        return 0.0
    r, c = r / r_scale, c / c_scale
    value = float(np.sum(r * c) / (math.sqrt(float(np.sum(r * r))) * math.sqrt(float(np.sum(c * c)))))
    return value if math.isnan(value) else min(max(value, -1.0), 1.0)


def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """10*log10(sum ref^2 / sum (cand - ref)^2): +inf when identical, -inf when ref is zero and cand is not."""
    r, c = _pair(ref, cand)
    noise = float(np.sum((c - r) ** 2))
    signal = float(np.sum(r * r))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def topk_agreement(ref: np.ndarray, cand: np.ndarray, k: int = 1, axis: int = -1) -> float:
    """Mean fraction of the reference top-k indices along ``axis`` that the candidate also ranks top-k.

    Ties are broken by index (stable sort), so the result is deterministic; k
    is capped at the axis length. 1.0 for empty arrays.
    """
    r, c = _pair(ref, cand)
    if r.ndim == 0:
        raise ValueError("top-k agreement needs at least one axis")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r, c = np.moveaxis(r, axis, -1), np.moveaxis(c, axis, -1)
    n = r.shape[-1]
    if r.size == 0 or n == 0:
        return 1.0
    k = min(k, n)
    r2, c2 = r.reshape(-1, n), c.reshape(-1, n)
    top_r = np.argsort(-r2, axis=-1, kind="stable")[:, :k]
    top_c = np.argsort(-c2, axis=-1, kind="stable")[:, :k]
    hits = (top_r[:, :, None] == top_c[:, None, :]).any(axis=-1).sum(axis=-1)
    return float(np.mean(hits / k))


def nan_inf_count(x: np.ndarray) -> dict[str, int]:
    """Numbers of NaN and of infinite (either sign) entries: {"nan": n, "inf": n}."""
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        return {"nan": 0, "inf": 0}
    return {"nan": int(np.count_nonzero(np.isnan(a))), "inf": int(np.count_nonzero(np.isinf(a)))}


def nonfinite_mismatch(ref: np.ndarray, cand: np.ndarray) -> int:
    """Entries where the candidate's NaN/Inf pattern differs from the reference's.

    An entry counts when exactly one side is NaN, or when one side is infinite
    and the other is not the same infinity. Equal NaN/Inf entries do not count:
    they are the reference's own values. Non-float arrays have none.
    """
    r, c = _pair(ref, cand)
    r_nan, c_nan = np.isnan(r), np.isnan(c)
    r_inf, c_inf = np.isinf(r), np.isinf(c)
    inf_differs = (r_inf | c_inf) & ~(r_inf & c_inf & (np.sign(r) == np.sign(c)))
    return int(np.count_nonzero((r_nan != c_nan) | (inf_differs & ~(r_nan | c_nan))))


def finite_pair(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries (flattened, float64) where both arrays are finite.

    The error metrics of arrays holding NaN or Inf are NaN; computed on these
    entries they still say how far the finite values are, and the NaN/Inf
    entries are judged apart with :func:`nonfinite_mismatch`.
    """
    r, c = _pair(ref, cand)
    keep = np.isfinite(r) & np.isfinite(c)
    return r[keep], c[keep]


def class_axis(shape: tuple[int, ...]) -> int | None:
    """The axis that would hold classes: the last one longer than 1 (trailing 1s, as in
    `[N, C, 1, 1]`, are skipped); None when every axis has length <= 1."""
    for axis in range(len(shape) - 1, -1, -1):
        if shape[axis] > 1:
            return axis
    return None


def distribution_rows(x: np.ndarray, axis: int, tol: float = 1e-3) -> bool:
    """Whether every row of `x` along `axis` is a probability distribution, or its log.

    Probabilities: entries in [0, 1] (to `tol`) summing to 1 within `tol`,
    as a softmax writes them. Log-probabilities: entries <= 0 whose
    log-sum-exp is 0 within `tol`, as a log-softmax writes them. An array with
    NaN or Inf, or with a row of one entry, is neither.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0 or a.size == 0 or a.shape[axis] < 2 or not np.all(np.isfinite(a)):
        return False
    a = np.moveaxis(a, axis, -1)
    if a.min() >= -tol and a.max() <= 1 + tol and np.all(np.abs(a.sum(axis=-1) - 1.0) <= tol):
        return True
    if a.max() <= tol:
        peak = a.max(axis=-1, keepdims=True)
        lse = peak[..., 0] + np.log(np.exp(a - peak).sum(axis=-1))
        return bool(np.all(np.abs(lse) <= tol))
    return False


def _json_float(v: float | None) -> float | str | None:
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


def compare(ref: np.ndarray, cand: np.ndarray, k: int = 5) -> dict[str, Any]:
    """Every metric at once as a JSON-serializable dict (see the module docstring for inf/NaN).

    Keys: max_abs_error, mean_abs_error, cosine, sqnr_db, top1_agreement,
    topk_agreement (with ``k``, along the last axis; None for scalars), k,
    and ref_nan, ref_inf, cand_nan, cand_inf counts.
    """
    r, c = _pair(ref, cand)
    has_axis = r.ndim > 0
    out: dict[str, Any] = {
        "max_abs_error": _json_float(max_abs_error(r, c)),
        "mean_abs_error": _json_float(mean_abs_error(r, c)),
        "cosine": _json_float(cosine(r, c)),
        "sqnr_db": _json_float(sqnr_db(r, c)),
        "top1_agreement": _json_float(topk_agreement(r, c, 1)) if has_axis else None,
        "topk_agreement": _json_float(topk_agreement(r, c, k)) if has_axis else None,
        "k": int(k),
    }
    for name, arr in (("ref", ref), ("cand", cand)):
        counts = nan_inf_count(arr)
        out[f"{name}_nan"] = counts["nan"]
        out[f"{name}_inf"] = counts["inf"]
    return out
