"""How the lowrank pass picks each layer's rank: from a per-layer energy threshold or a global
parameter / error budget, kept only where the factorized form is faster than the dense one, with the
budget re-allocated around the layers that lost in timing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxopt.kernels.lowrank import energy_rank, max_useful_rank, round_rank
from onnxopt.kernels.lowrank_budget import LayerCurve, allocate_ranks, allowed_ranks, factor_params
from onnxopt.passes.lowrank.layers import Layer, has_bias, skip_rows
from onnxopt.passes.lowrank.options import LowRankOptions
from onnxopt.passes.lowrank.timing import time_layer


def rank_row(L: Layer, r: int) -> dict[str, Any]:
    """The report row of layer `L` at rank `r` (0: dense): shapes, predicted error, what it saves."""
    rows = int(np.prod(L.in_shape)) // L.m if L.in_shape else 1
    err2 = float(L.computed_curve[min(r, len(L.computed_curve) - 1)]) if r > 0 else 0.0
    return {
        "node": "+".join(M.node.name or M.node.outputs[0].name for M in L.members or [L]),
        "op": L.kind,
        "m": L.m,
        "n": L.n,
        "rows": rows,
        "input_shape": list(L.in_shape),
        "bias": has_bias(L),
        "rank": r,
        "max_useful_rank": max_useful_rank(L.m, L.n),
        "energy_kept": round(1.0 - err2, 6),
        "predicted_error": round(float(np.sqrt(err2)), 6),
        "params_saved": L.m * L.n - factor_params(L.m, L.n, r),
        "macs_saved": rows * (L.m * L.n - factor_params(L.m, L.n, r)),
    }


class RankChooser:
    """Chooses ranks under the pass's options (budget, energy, rounding, timing)."""

    def __init__(self, o: LowRankOptions) -> None:
        self.o = o
        self.budget = o.params is not None or o.error is not None

    def choose(self, layers: list[Layer], skipped: list[dict[str, str]]) -> None:
        """Pick ranks, time each chosen layer, and re-allocate around the layers that lost to dense."""
        total = sum(L.m * L.n for L in layers)
        for L in layers:
            L.cap = max_useful_rank(L.m, L.n)
        for _ in range(max(self.o.rounds, 0) + 1):
            self._assign(layers, total)
            lost = [L for L in layers if L.rank > 0 and not self.faster(L)]
            if not lost:
                break
            for L in lost:
                L.cap = self.fast_cap(L) if self.budget else 0
                L.rank = 0
        for L in layers:
            self._decide(L, skipped)

    def _assign(self, layers: list[Layer], total: int) -> None:
        """Ranks for the layers still in play (cap > 0): from the budget, else the energy threshold."""
        o = self.o
        live = [L for L in layers if L.cap > 0]
        for L in layers:
            L.rank = 0
        if not self.budget:
            for L in live:
                L.rank = self.energy_rank(L)
            return
        share = None if o.params is None else o.params * total / max(sum(L.m * L.n for L in live), 1)
        ranks = allocate_ranks(
            [LayerCurve(L.m, L.n, L.computed_curve, L.cap) for L in live],
            o.multiple,
            params=share,
            error=o.error if o.params is None else None,
        )
        for L, r in zip(live, ranks):
            L.rank = r

    def _decide(self, L: Layer, skipped: list[dict[str, str]]) -> None:
        """Write the layer's decision into its row (and `skipped` when it stays dense)."""
        if L.rank > 0:
            L.row.pop("why", None)
            L.row["decision"] = "factorized"
            return
        reason = L.row.pop("why", None) or "dense kept: no rank within the budget"
        L.row.update(rank_row(L, 0), decision=reason)
        L.row.setdefault("dense_us", None)
        L.row.setdefault("factorized_us", None)
        skipped.extend(skip_rows(L, reason))

    def fast_cap(self, L: Layer) -> int:
        """Largest allowed rank below L.rank whose factorized form wins in timing (binary search; 0 if none).

        Factorized time falls with the rank, so the winning ranks form a tail of the descending list.
        """
        lost_at, row = L.rank, dict(L.row)
        ranks = allowed_ranks(L.m, L.n, self.o.multiple, lost_at - 1)
        lo, hi, best = 0, len(ranks) - 1, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            L.rank = ranks[mid]
            if self.faster(L):
                best, hi = ranks[mid], mid - 1
            else:
                lo = mid + 1
        L.row = row  # keep the timing that made the layer lose until it is chosen again
        return best

    def energy_rank(self, L: Layer) -> int:
        """Smallest rank keeping `energy` of the (whitened) spectrum, rounded; 0 if it saves nothing."""
        s2 = np.maximum(-np.diff(L.computed_curve), 0.0)  # squared singular values, normalized
        if s2.sum() <= 0:
            return 0
        r = round_rank(energy_rank(np.sqrt(s2), self.o.energy), self.o.multiple, limit=min(L.m, L.n))
        if r > L.cap:
            L.row.update(rank_row(L, r))
            L.row["why"] = (
                f"rank {r} for energy {self.o.energy} saves nothing or lost in timing "
                f"(parameters drop below rank {L.m * L.n / (L.m + L.n):.1f})"
            )
            return 0
        return r

    def faster(self, L: Layer) -> bool:
        """Time dense vs factorized at L.rank (cached) and record it; True when factorized wins."""
        L.row.update(rank_row(L, L.rank))
        if not self.o.timing:
            L.row.update(dense_us=None, factorized_us=None)
            return True
        t_d, t_f, cmp = time_layer(L, L.rank)
        L.row.update(dense_us=round(t_d * 1e6, 2), factorized_us=round(t_f * 1e6, 2))
        ok = cmp.high <= 1.0 / self.o.min_speedup  # undecided within the noise: stays dense
        if not ok:
            L.row["why"] = (
                f"factorized at rank {L.rank} not faster beyond the noise: {t_f * 1e6:.1f} us vs dense "
                f"{t_d * 1e6:.1f} us ({cmp.describe()})"
            )
        return ok
