"""Rank budgets for low-rank factorization: error curves per layer and a global rank allocation.

Completes `kernels.lowrank` (factors of one matrix) with what a pass needs to
pick ranks for many layers at once: the relative output error of a layer at
every rank (weight-only or whitened by calibration statistics), the exact
output energy of y = x W + b from streamed moments, the bias correction that
removes the mean of the factorization error, and a greedy allocator that
spends a global parameter or error budget where it costs least error per
parameter saved. Pure numpy/scipy.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .lowrank import damped_cholesky, max_useful_rank

__all__ = [
    "LayerCurve",
    "plain_error_curve",
    "whitened_error_curve",
    "output_energy",
    "corrected_bias",
    "relative_output_error",
    "allowed_ranks",
    "factor_params",
    "allocate_ranks",
]


@dataclass
class LayerCurve:
    """One layer for rank allocation: W is m x n; ``err2[r]`` the relative squared error at rank r (0..k)."""

    m: int
    n: int
    err2: np.ndarray
    #: Highest rank this layer may use (timing or user caps); 0 keeps the layer dense.
    cap: int = 0

    def __post_init__(self) -> None:
        if self.cap <= 0:
            self.cap = max_useful_rank(self.m, self.n)


def _tail_sq(s: np.ndarray) -> np.ndarray:
    """tail[r] = sum_{i>=r} s_i^2 for r = 0..k."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


def plain_error_curve(W: np.ndarray) -> np.ndarray:
    """Relative squared Frobenius error ||W - W_r||^2 / ||W||^2 of the best rank-r W_r, r = 0..min(m, n)."""
    s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
    tail = _tail_sq(s)
    return tail / tail[0] if tail[0] > 0 else np.zeros_like(tail)


def whitened_error_curve(W: np.ndarray, cov: np.ndarray, energy: float, eps: float = 1e-6) -> np.ndarray:
    """Relative squared output error E||x (W - A_r B_r)||^2 / ``energy`` of the whitened rank-r factors.

    ``cov`` is the (centered or uncentered) moment matrix the factors are
    whitened by, with the same damping as `kernels.lowrank.whitened_svd`, so
    the curve is exact for the factors that function returns. ``energy`` is
    the layer's output energy E||y||^2 (see `output_energy`).
    """
    cov = np.asarray(cov, dtype=np.float64)
    L = damped_cholesky(0.5 * (cov + cov.T), eps)
    s = np.linalg.svd(L.T @ np.asarray(W, dtype=np.float64), compute_uv=False)
    tail = _tail_sq(s)
    return tail / energy if energy > 0 else np.zeros_like(tail)


def output_energy(W: np.ndarray, second_moment: np.ndarray, mean: np.ndarray, bias: np.ndarray | None = None) -> float:
    """E||x W + b||^2 per row from the input moments E[x^T x] and E[x]."""
    W = np.asarray(W, dtype=np.float64)
    # trace(W^T S W) as one BLAS product: a three-operand einsum runs unblocked (33 s on MiniLM)
    e = float(np.sum((np.asarray(second_moment, dtype=np.float64) @ W) * W))
    if bias is not None:
        b = np.asarray(bias, dtype=np.float64).reshape(-1)
        e += 2.0 * float(np.asarray(mean, dtype=np.float64) @ W @ b) + float(b @ b)
    return max(e, 0.0)


def corrected_bias(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, mean: np.ndarray, bias: np.ndarray | None = None
) -> np.ndarray:
    """Bias b + E[x] (W - A B) that makes the factorized layer's output error zero-mean."""
    W = np.asarray(W, dtype=np.float64)
    delta = np.asarray(mean, dtype=np.float64) @ (W - np.asarray(A, np.float64) @ np.asarray(B, np.float64))
    base = np.zeros(W.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    return base + delta


def relative_output_error(
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    second_moment: np.ndarray,
    mean: np.ndarray,
    bias: np.ndarray | None = None,
    new_bias: np.ndarray | None = None,
) -> float:
    """sqrt(E||(x W + b) - (x A B + b')||^2 / E||x W + b||^2) from the input moments (no damping)."""
    W = np.asarray(W, dtype=np.float64)
    D = W - np.asarray(A, np.float64) @ np.asarray(B, np.float64)
    b = np.zeros(W.shape[1]) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    nb = b if new_bias is None else np.asarray(new_bias, np.float64).reshape(-1)
    err = output_energy(D, second_moment, mean, b - nb)
    ref = output_energy(W, second_moment, mean, b)
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0


def factor_params(m: int, n: int, rank: int) -> int:
    """Parameters of the layer at ``rank`` (0 = dense m*n)."""
    return m * n if rank <= 0 else rank * (m + n)


def allowed_ranks(m: int, n: int, multiple: int, cap: int | None = None) -> list[int]:
    """Ranks up to ``cap`` that save parameters, descending: multiples of ``multiple``, or every
    useful rank when the layer is too small for even one multiple."""
    useful = max_useful_rank(m, n)
    top = useful if cap is None else min(useful, cap)
    if top < 1:
        return []
    if useful < multiple:
        return list(range(top, 0, -1))
    return list(range((top // multiple) * multiple, 0, -multiple))


def allocate_ranks(
    layers: list[LayerCurve], multiple: int = 1, params: float | None = None, error: float | None = None
) -> list[int]:
    """Ranks (0 = dense) meeting a global budget with the least error, greedily.

    ``params``: remove at least this fraction of the layers' total m*n
    parameters (stops as soon as reached). ``error``: keep the root-sum-square
    of the layers' relative errors within ``error`` while removing as many
    parameters as possible. Each step moves one layer to a lower allowed rank,
    choosing the move with the least added squared error per parameter saved;
    a move may skip ranks (the lower convex hull of the error curve), so a
    layer whose first useful rank is expensive but whose later ranks are cheap
    is still considered. Exactly one of the budgets must be given.
    """
    if (params is None) == (error is None):
        raise ValueError("give exactly one of params or error")
    ranks = [0] * len(layers)
    options = [allowed_ranks(L.m, L.n, multiple, L.cap) for L in layers]
    total = sum(L.m * L.n for L in layers)
    need = (params or 0.0) * total
    room = (error or 0.0) ** 2
    if need <= 0 and room <= 0:
        return ranks
    saved = 0.0
    spent = 0.0

    def best_move(i: int) -> tuple[float, int] | None:
        L, cur = layers[i], ranks[i]
        p_cur, e_cur = factor_params(L.m, L.n, cur), (float(L.err2[cur]) if cur else 0.0)
        best: tuple[float, int] | None = None
        for r in options[i]:
            if cur and r >= cur:
                continue
            gain = p_cur - factor_params(L.m, L.n, r)
            cost = max(float(L.err2[r]) - e_cur, 0.0)
            if params is not None and gain <= 0:
                continue
            if error is not None and spent + cost > room * (1 + 1e-12):
                continue
            ratio = cost / gain
            if best is None or ratio < best[0]:
                best = (ratio, r)
            if params is not None and saved + gain >= need:
                break  # no need to jump past the rank that meets the budget
        return best

    heap: list[tuple[float, int, int]] = []
    for i in range(len(layers)):
        mv = best_move(i)
        if mv is not None:
            heapq.heappush(heap, (mv[0], i, mv[1]))
    while heap:
        if params is not None and saved >= need:
            break
        _, i, r = heapq.heappop(heap)
        mv = best_move(i)  # budgets moved since it was queued: re-check
        if mv is None:
            continue
        if mv[1] != r:
            heapq.heappush(heap, (mv[0], i, mv[1]))
            continue
        L = layers[i]
        saved += factor_params(L.m, L.n, ranks[i]) - factor_params(L.m, L.n, r)
        spent += max(float(L.err2[r]) - (float(L.err2[ranks[i]]) if ranks[i] else 0.0), 0.0)
        ranks[i] = r
        nxt = best_move(i)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], i, nxt[1]))
    return ranks
