"""The search for the layers to keep float: per-layer sensitivity trials, then the fewest most
sensitive layers whose float form lets the model reach its SQNR target.

The trials are independent and run through the executor (`sensitivity`); the
bisection over how many layers to keep float is serial. Every trial of the pass
goes through `run_trials`, so one spy on this module's `sensitivity` sees them all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from onnxopt.passes.quantize.qdq import ActParams, LayerQuant
from onnxopt.passes.quantize.sensitivity import Trial, sensitivity
from onnxopt.passes.quantize.state import Work


def fewest_float(limit: int, sqnr_at: Callable[[int], float], target: float) -> int:
    """The fewest layers (at most `limit`) to keep float so that `sqnr_at(k)` reaches `target`,
    by bisection (SQNR grows with k); `limit` when even that falls short."""
    if sqnr_at(0) >= target:
        return 0
    if sqnr_at(limit) < target:
        return limit
    lo, hi = 0, limit  # sqnr_at(lo) < target <= sqnr_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sqnr_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def run_trials(work: Work, trials: Sequence[Trial]) -> dict[str, float]:
    """Output SQNR (dB) of each trial against the float model on the sensitivity samples, run by the
    executor of the run: {trial name: dB}."""
    return sensitivity(work.model, work.drawn_samples, trials, work.executor, reference=work.float_reference)


def layer_sensitivity(
    work: Work, acts: dict[str, ActParams], layers: dict[str, LayerQuant], names: list[str]
) -> dict[str, float]:
    """Output SQNR (dB) with each of `names` alone in int8 (no weight-only storage elsewhere): one
    independent trial per layer and form, run by the executor; a (layer, form) measured earlier in
    the run (`forms.choose_forms`) is not measured again."""
    todo = [n for n in names if (n, layers[n].form) not in work.alone_sqnr]
    found = run_trials(work, [Trial(n, work.qdq_tensors(acts, [layers[n]]), [layers[n]]) for n in todo])
    for n in todo:
        work.alone_sqnr[(n, layers[n].form)] = found[n]
    return {n: work.alone_sqnr[(n, layers[n].form)] for n in names}


def keep_sensitive_float(
    work: Work, acts: dict[str, ActParams], layers: dict[str, LayerQuant], compute_ref: list, stats: dict
) -> list[str]:
    """The layers of `layers` that stay int8 when the most sensitive ones (at most `max_float_layers`)
    are kept float until the model reaches `target_sqnr` against `compute_ref`; each layer's
    sensitivity and each one kept float are reported."""
    kept = list(layers)
    sens = layer_sensitivity(work, acts, layers, kept)
    for name in kept:
        work.rows[name]["sensitivity_sqnr_db"] = round(sens[name], 2)
    order = sorted(kept, key=lambda k: sens[k])
    limit = len(order) if work.opts.max_float_layers < 0 else min(work.opts.max_float_layers, len(order))

    @functools.cache
    def sqnr_with_float(k: int) -> float:
        return (
            work.output_sqnr(work.build(acts, [layers[x] for x in order[k:]]), compute_ref)
            if k < len(order)
            else float("inf")
        )

    k = fewest_float(limit, sqnr_with_float, work.opts.target_sqnr)
    for name in order[:k]:
        work.rows[name].update(int8=False, why=f"sensitive (alone {sens[name]:.1f} dB)")
    stats["sqnr_all_int8_db"] = round(sqnr_with_float(0), 2)
    return order[k:]
