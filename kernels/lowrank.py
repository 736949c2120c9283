"""Low-rank factorization numerics: W (m x n) ~= A (m x r) @ B (r x n).

Layers compute y = x @ W. Plain truncated SVD minimizes ||W - AB||; the
whitened SVD minimizes the expected output error E||x W - x A B||^2 on the
calibration data, which is what accuracy depends on. Singular values are split
evenly (sqrt) between A and B so both factors have similar magnitudes, which
helps later quantization.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

__all__ = [
    "truncated_svd",
    "whitened_svd",
    "energy_rank",
    "rank_for_param_budget",
    "max_useful_rank",
    "round_rank",
    "predicted_error",
    "error_curve",
    "CovarianceAccumulator",
]


def _check_rank(rank: int, m: int, n: int) -> int:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return min(int(rank), m, n)


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    root = np.sqrt(s)
    return (u * root).astype(dtype), (root[:, None] * vt).astype(dtype)


def _out_dtype(w: np.ndarray) -> np.dtype:
    return w.dtype if np.issubdtype(w.dtype, np.floating) else np.dtype(np.float64)


def truncated_svd(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best Frobenius rank-``rank`` factors (A, B) of W, computed in float64, returned in W's dtype."""
    W = np.asarray(W)
    m, n = W.shape
    r = _check_rank(rank, m, n)
    u, s, vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    return _split(u[:, :r], s[:r], vt[:r], _out_dtype(W))


def predicted_error(singular_values: np.ndarray, rank: int) -> float:
    """Relative Frobenius error sqrt(sum_{i>=rank} s_i^2 / sum s_i^2) of keeping ``rank`` values."""
    return float(error_curve(singular_values)[min(max(int(rank), 0), len(singular_values))])


def error_curve(singular_values: np.ndarray) -> np.ndarray:
    """Relative error for every rank 0..k (length k+1); non-increasing, ends at 0.

    An all-zero spectrum gives all zeros (nothing to lose).
    """
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    total = tail[0]
    if total == 0:
        return np.zeros(s2.size + 1)
    return np.sqrt(np.maximum(tail, 0.0) / total)


def damped_cholesky(cov: np.ndarray, eps: float) -> np.ndarray:
    """Lower Cholesky factor of cov + damp*I, damp = eps * mean diagonal, raised until it factors."""
    m = cov.shape[0]
    scale = float(np.trace(cov)) / m if m else 0.0
    damp = eps * (scale if scale > 0 else 1.0)
    for _ in range(12):
        try:
            return scipy.linalg.cholesky(cov + damp * np.eye(m), lower=True)
        except np.linalg.LinAlgError:
            damp = max(damp * 10.0, 1e-12)
    raise np.linalg.LinAlgError("covariance is not positive semi-definite even after damping")


def whitened_svd(W: np.ndarray, cov: np.ndarray, rank: int, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """Data-aware factors for y = x @ W minimizing E||x W - x A B||^2.

    ``cov`` is the second moment E[x^T x] (m x m, mean included, see
    :meth:`CovarianceAccumulator.second_moment`). With L the Cholesky factor
    of cov + damp*I, the error equals ||L^T (W - AB)||_F^2, so the best factors
    come from the SVD U S V^T of L^T W: A = L^{-T} U_r S_r^{1/2},
    B = S_r^{1/2} V_r^T. Returns (A, B, predicted relative RMS output error),
    the error being exact for the damped covariance.
    """
    W = np.asarray(W)
    m, n = W.shape
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (m, m):
        raise ValueError(f"covariance shape {cov.shape} does not match W rows {m}")
    r = _check_rank(rank, m, n)
    L = damped_cholesky(0.5 * (cov + cov.T), eps)
    u, s, vt = np.linalg.svd(L.T @ W.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:r])
    A = scipy.linalg.solve_triangular(L.T, u[:, :r] * root, lower=False)
    B = root[:, None] * vt[:r]
    dtype = _out_dtype(W)
    return A.astype(dtype), B.astype(dtype), predicted_error(s, r)


def energy_rank(singular_values: np.ndarray, energy: float = 0.98) -> int:
    """Smallest rank keeping at least ``energy`` of sum s_i^2 (at least 1; 0 for an empty spectrum)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    if s2.size == 0:
        return 0
    total = s2.sum()
    if total == 0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(np.searchsorted(kept, energy * (1 - 1e-12), side="left") + 1, s2.size))


def max_useful_rank(m: int, n: int) -> int:
    """Largest r with r*(m+n) < m*n: the largest rank that still saves parameters (may be 0)."""
    return (m * n - 1) // (m + n)


def rank_for_param_budget(m: int, n: int, ratio: float) -> int:
    """Largest rank whose factors hold at most ``ratio`` of the m*n original parameters."""
    if ratio <= 0:
        return 0
    return int(min(np.floor(ratio * m * n / (m + n)), min(m, n)))


def round_rank(r: int, multiple: int, limit: int | None = None) -> int:
    """Round r up to a multiple (hardware-friendly widths); if that exceeds ``limit``, round down instead.

    Never returns less than 1 for r >= 1; returns ``limit`` itself when no
    multiple fits under it.
    """
    if multiple < 1:
        raise ValueError("multiple must be >= 1")
    if r <= 0:
        return 0
    up = -(-int(r) // multiple) * multiple
    if limit is None or up <= limit:
        return up
    down = (int(limit) // multiple) * multiple
    return down if down >= 1 else int(limit)


class CovarianceAccumulator:
    """Streamed sums of x^T x, x and the row count (float64) for inputs of dimension ``dim``.

    Any leading axes are treated as rows (batch, tokens, pixels). Merging two
    accumulators equals one pass over all rows up to float64 summation order.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.sum_xtx = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.sum_x = np.zeros(self.dim, dtype=np.float64)
        self.count = 0

    def update(self, x: np.ndarray) -> CovarianceAccumulator:
        """Add rows of ``x`` (shape [..., dim]); returns ``self``."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got {x.shape[-1]}")
        rows = x.reshape(-1, self.dim)
        self.sum_xtx += rows.T @ rows
        self.sum_x += rows.sum(axis=0)
        self.count += rows.shape[0]
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's sums; returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dimension {other.dim} into {self.dim}")
        self.sum_xtx += other.sum_xtx
        self.sum_x += other.sum_x
        self.count += other.count
        return self

    def finite(self) -> bool:
        """True when every sum is finite (no inf/NaN was seen in the rows)."""
        return bool(np.isfinite(self.sum_xtx).all() and np.isfinite(self.sum_x).all())

    def second_moment(self) -> np.ndarray:
        """E[x^T x] (the matrix :func:`whitened_svd` wants); zeros when empty."""
        return self.sum_xtx / max(self.count, 1)

    def mean(self) -> np.ndarray:
        """E[x]; zeros when empty."""
        return self.sum_x / max(self.count, 1)

    def covariance(self) -> np.ndarray:
        """Centered covariance E[x^T x] - E[x]^T E[x]."""
        mu = self.mean()
        return self.second_moment() - np.outer(mu, mu)

    def to_dict(self) -> dict[str, Any]:
        """Arrays and count, ready for ``np.savez``."""
        return {"dim": self.dim, "sum_xtx": self.sum_xtx, "sum_x": self.sum_x, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CovarianceAccumulator:
        """Rebuild from :meth:`to_dict` output (or a loaded npz)."""
        acc = cls(int(d["dim"]))
        acc.sum_xtx = np.array(d["sum_xtx"], dtype=np.float64)
        acc.sum_x = np.array(d["sum_x"], dtype=np.float64)
        acc.count = int(d["count"])
        return acc
