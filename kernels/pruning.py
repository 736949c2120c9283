"""Numerics of structured pruning: channel importance, budgeted selection, bias folding, ridge refit.

Pure numpy; the prune pass maps graph tensors to the arrays used here. Weights
are viewed as "consumer matrices" W of shape [out, C, taps] (a Conv weight
[O, C, kh, kw] reshaped, a Gemm/MatMul B as [N, K, 1]) so one code path serves
every op that sums over channels.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from .lowrank import CovarianceAccumulator


class ChannelStats:
    """Streamed per-channel mean, mean |x| and channel covariance of a tensor (channels on `axis`).

    Every other axis counts as rows (batch, pixels, tokens). Mergeable like the
    covariance accumulator it wraps.
    """

    def __init__(self, axis: int, dim: int) -> None:
        self.axis = axis
        self.cov = CovarianceAccumulator(dim)
        self.sum_abs = np.zeros(dim, dtype=np.float64)

    def update(self, x: np.ndarray) -> ChannelStats:
        rows = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, -1).reshape(-1, self.cov.dim)
        self.cov.update(rows)
        self.sum_abs += np.abs(rows).sum(axis=0)
        return self

    def merge(self, other: ChannelStats) -> ChannelStats:
        self.cov.merge(other.cov)
        self.sum_abs += other.sum_abs
        return self

    def mean(self) -> np.ndarray:
        return self.cov.mean()

    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.cov.count, 1)

    def covariance(self) -> np.ndarray:
        return self.cov.covariance()


def weight_norms(w: np.ndarray, axis: int, order: int = 1) -> np.ndarray:
    """L1 (order=1) or squared-L2 (order=2) norm of each slice of `w` along `axis`."""
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(moved).sum(axis=1) if order == 1 else (moved**2).sum(axis=1)


def conditional_variance(cov: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Var(x_c | all other channels) for each c: what a least-squares refit cannot recover if c goes."""
    c = np.asarray(cov, dtype=np.float64)
    lam = ridge * max(float(np.mean(np.diag(c))), 1e-12)
    a = c + lam * np.eye(len(c))
    try:
        # diag((L L^T)^-1) = column sums of (L^-1)^2: a Cholesky and a triangular solve, several
        # times faster than the eigendecomposition pinv needs (seconds at 1536 channels)
        low = scipy.linalg.cholesky(a, lower=True)
        inv_low = scipy.linalg.solve_triangular(low, np.eye(len(c)), lower=True)
        diag = (inv_low**2).sum(axis=0)
    except np.linalg.LinAlgError:
        diag = np.diag(np.linalg.pinv(a, hermitian=True))
    return 1.0 / np.maximum(diag, 1e-30)


def removal_error(w: np.ndarray, channel_var: np.ndarray) -> np.ndarray:
    """Predicted output energy lost per channel: ||W[:, c, :]||^2 * variance that remains after compensation.

    `w` is a consumer matrix [out, C, taps]; `channel_var` per channel (Var(x_c)
    with bias folding, conditional variance with a refit, E[x_c^2] without either).
    """
    return (np.asarray(w, dtype=np.float64) ** 2).sum(axis=(0, 2)) * np.asarray(channel_var, dtype=np.float64)


def bias_fold(w: np.ndarray, removed: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Bias change [out] that replaces removed channels by their constant (or mean) value.

    `w` [out, C, taps]; `value` [len(removed)]. Exact for a constant input and no zero padding.
    """
    wr = np.asarray(w, dtype=np.float64)[:, removed, :].sum(axis=2)
    return wr @ np.asarray(value, dtype=np.float64)


def ridge_refit(
    w: np.ndarray, cov: np.ndarray, mean: np.ndarray, kept: np.ndarray, removed: np.ndarray, ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares compensation: predict removed channels from kept ones and fold into W and bias.

    With x_r ~ A x_k + (mu_r - A mu_k), A = S_rk (S_kk + l I)^-1 (centered
    covariances of the calibration activations), the consumer's W_r x_r term
    moves into the kept weights (W_k + W_r A per tap) and the bias. Returns the
    new kept weights [out, |kept|, taps] and the bias change [out].
    """
    w = np.asarray(w, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    skk = cov[np.ix_(kept, kept)]
    srk = cov[np.ix_(removed, kept)]
    lam = ridge * max(float(np.mean(np.diag(skk))) if len(kept) else 0.0, 1e-12)
    a = np.linalg.solve(skk + lam * np.eye(len(kept)), srk.T).T
    wr = w[:, removed, :]
    new_wk = w[:, kept, :] + np.einsum("orh,rk->okh", wr, a)
    offset = mean[removed] - a @ mean[kept]
    return new_wk, wr.sum(axis=2) @ offset


def select_channels(
    scores: Sequence[np.ndarray],
    node_macs: Sequence[float],
    memberships: Sequence[Sequence[Sequence[tuple[int, int, int]]]],
    node_sizes: Sequence[tuple[int, int]],
    target: float,
    max_ratio: float,
    multiple: int,
) -> list[list[int]]:
    """Greedy budgeted selection of channels to remove, lowest normalized score first.

    The removed channel indices per group; `select_channel_steps` (same arguments) gives the
    same choice as the ordered chunks it was taken in.
    """
    removed: list[list[int]] = [[] for _ in scores]
    for g, chunk in select_channel_steps(scores, node_macs, memberships, node_sizes, target, max_ratio, multiple):
        removed[g].extend(chunk)
    return removed


def select_channel_steps(
    scores: Sequence[np.ndarray],
    node_macs: Sequence[float],
    memberships: Sequence[Sequence[Sequence[tuple[int, int, int]]]],
    node_sizes: Sequence[tuple[int, int]],
    target: float,
    max_ratio: float,
    multiple: int,
) -> list[tuple[int, list[int]]]:
    """The greedy selection of `select_channels` as (group, chunk of channel indices) steps, in order.

    Each prefix of the steps is the selection a smaller budget would make, so a caller can back
    off along it (the prune pass's accuracy guard).

    scores[g]: importance of each channel of group g (normalized by the group mean
    here so groups compare). memberships[g][c]: (node, side 0=out/1=in, count)
    positions of channel c in MAC nodes. node_macs/node_sizes: MACs and (out, in)
    channel counts of each MAC node; a node's MACs scale with kept_out/out *
    kept_in/in. Channels go in chunks that keep each group's count a multiple of
    `multiple`, at most `max_ratio` of a group, until the MACs fall to
    (1-target) of the start.
    """
    kept = [[float(o), float(i)] for o, i in node_sizes]
    total0 = float(sum(node_macs))
    total = total0
    goal = (1.0 - target) * total0
    orders: list[list[int]] = []
    removed: list[list[int]] = [[] for _ in scores]
    heap: list[tuple[float, int]] = []
    steps: list[tuple[int, list[int]]] = []
    norm = [np.asarray(s, dtype=np.float64) / max(float(np.mean(s)), 1e-30) if len(s) else np.zeros(0) for s in scores]
    for s in norm:
        orders.append(list(np.argsort(s, kind="stable")))

    def chunk(g: int) -> list[int] | None:
        n, done = len(norm[g]), len(removed[g])
        size = ((n - done) % multiple) or multiple
        limit = int(np.floor(max_ratio * n))
        if done + size > limit or n - done - size < max(multiple, 1):
            return None
        return orders[g][done : done + size]

    for g in range(len(norm)):
        c = chunk(g)
        if c is not None:
            heapq.heappush(heap, (float(norm[g][c].mean()), g))
    while heap and total > goal:
        _, g = heapq.heappop(heap)
        c = chunk(g)
        if c is None:
            continue
        for ch in c:
            for node, side, count in memberships[g][ch]:
                before = node_macs[node] * mac_fraction(kept[node], node_sizes[node])
                kept[node][side] -= count
                total += node_macs[node] * mac_fraction(kept[node], node_sizes[node]) - before
        removed[g].extend(int(ch) for ch in c)
        steps.append((g, [int(ch) for ch in c]))
        nxt = chunk(g)
        if nxt is not None:
            heapq.heappush(heap, (float(norm[g][nxt].mean()), g))
    return steps


def mac_fraction(kept: Sequence[float], size: tuple[int, int]) -> float:
    """Fraction of a MAC node's cost left with `kept` (out, in) of `size` (out, in) channels (0 = not counted)."""
    o, i = size
    return (kept[0] / o if o else 1.0) * (kept[1] / i if i else 1.0)
