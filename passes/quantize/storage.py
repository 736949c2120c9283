"""Int8 weight storage for the layers that compute in float: which weights get it, within the
`storage_sqnr` budget, and only where onnxruntime folds them back into float constants at load.

Two kinds of layers store int8 weights: candidates left float (slower in int8,
too sensitive), written by `apply_qdq` as Cast -> Mul next to the QDQ layers,
and the layers outside the calibrated path (recurrent ones, those in bodies),
written by `store_weights` where their weight is defined.
"""

from __future__ import annotations

import dataclasses
import functools

import onnx

from onnxopt.ir.ops import INT8_STORAGE_MIN_ELEMENTS
from onnxopt.passes.quantize.layer_weights import stored_layer, weight_store
from onnxopt.passes.quantize.optimized import same_optimized_graph
from onnxopt.passes.quantize.qdq import ActParams, LayerQuant, WeightStore, apply_qdq, store_weights
from onnxopt.passes.quantize.search import fewest_float, run_trials
from onnxopt.passes.quantize.sensitivity import Trial
from onnxopt.passes.quantize.state import Row, Work, static
from onnxopt.verify.outputs import reference_outputs

UNFOLDED = "float (onnxruntime would not fold int8 storage at load)"


def plan_storage(work: Work, acts: dict[str, ActParams], stats: dict) -> list:
    """Choose `work.store` (weight_storage=int8) and return the outputs int8 compute is judged
    against: the float model's, or the int8-stored model's when weights are stored (storage has
    its own budget). A small model whose stored weights onnxruntime does not fold stores none."""
    compute_ref = work.float_reference
    if work.opts.weight_storage != "int8":
        return compute_ref
    work.store = choose_storage(work, work.cands, stats)
    stored_only = work.build(acts, []) if work.store else work.model
    if work.store and not work.big and not storage_folds(work, stored_only):
        work.notes.append("onnxruntime does not fold the int8-stored weights at load here: float weights kept")
        work.store = {}
    elif work.store:
        compute_ref = reference_outputs(stored_only, work.drawn_samples)
    return compute_ref


def choose_storage(work: Work, cands: list[onnx.NodeProto], stats: dict) -> dict[str, LayerQuant]:
    """The layers that store int8 weights when left float: every weight of at least
    INT8_STORAGE_MIN_ELEMENTS, less those onnxruntime would not fold back at load (big models:
    checked here layer by layer, `folding_alone`; others: the whole model in `plan_storage`), less
    (accuracy-aware) the ones whose rounding costs most, kept float until the stored model
    alone reaches `storage_sqnr` against float."""
    store = {
        n.name: stored_layer(work, n)
        for n in cands
        if work.consts[n.input[1]].ndim >= 2 and work.consts[n.input[1]].size >= INT8_STORAGE_MIN_ELEMENTS
    }
    if work.big:
        store = folding_alone(work, store)
    if not store or not work.opts.accuracy_aware:
        return store
    sens = run_trials(work, [Trial(name, stored=[lq]) for name, lq in store.items()])
    for name, v in sens.items():
        work.rows[name]["storage_sqnr_db"] = round(v, 2)
    order = sorted(store, key=lambda k: sens[k])

    @functools.cache
    def sqnr_at(k: int) -> float:
        return (
            work.output_sqnr(apply_qdq(work.model, {}, [], [store[name] for name in order[k:]]))
            if k < len(order)
            else float("inf")
        )

    k = fewest_float(len(order), sqnr_at, work.opts.storage_sqnr)
    stats["sqnr_storage_db"] = round(sqnr_at(k), 2)
    for name in order[:k]:
        work.rows[name]["weight_storage"] = f"float (rounding alone {sens[name]:.1f} dB)"
    return {name: store[name] for name in order[k:]}


def storage_folds(work: Work, stored: onnx.ModelProto) -> bool:
    """Whether onnxruntime folds the int8-stored weights of `stored` (the model with the layers of
    `work.store` stored) back into constants at load: its optimized graph has the same node
    types as the float model's."""
    return same_optimized_graph(stored, work.model)


def folding_alone(work: Work, store: dict[str, LayerQuant]) -> dict[str, LayerQuant]:
    """The layers of `store` whose int8-stored weight onnxruntime folds back at load, each checked
    in a model of that layer alone (big models: a session over the whole int8-stored model
    would fold every layer at once and hold each one's Cast and Mul outputs together, about 3x
    the float weights). Onnxruntime decides each fold from the node and its constant inputs
    alone (its output size cap included), so the answer is the whole model's, per layer."""
    folds = {}
    for name, lq in store.items():
        n = work.nodes[name]
        info = work.info.get(n.input[0])
        float_layer = work.layer_model(n, info.shape if info and static(info.shape) else None)
        local = dataclasses.replace(lq, node=float_layer.graph.node[0].name)
        stored_layer_model = apply_qdq(float_layer, {}, [], [local])
        if same_optimized_graph(stored_layer_model, float_layer):
            folds[name] = lq
        else:
            work.rows[name]["weight_storage"] = UNFOLDED
    if len(folds) < len(store):
        work.notes.append(
            f"onnxruntime does not fold the int8-stored weights of {len(store) - len(folds)} "
            f"of {len(store)} layers at load here: float weights kept for them"
        )
    return folds


def store_outside(work: Work, final: onnx.ModelProto, stats: dict) -> onnx.ModelProto:
    """`final` with int8 storage for the weights of `work.outside` (recurrent layers, layers inside
    bodies), measured like the rest: each weight's rounding alone (output SQNR against float),
    then the weights that cost most stay float until the model with all of them stored reaches
    `storage_sqnr`; kept only if onnxruntime folds every stored weight back at load (bodies
    included), else said so per layer."""
    if not work.outside:
        return final
    stores = _outside_stores(work)
    if not stores:
        return final
    work.ensure_reference()
    alone = {t: work.output_sqnr(store_weights(work.model, [st])) for t, st in stores.items()}
    order = sorted(stores, key=lambda t: alone[t])

    @functools.cache
    def sqnr_at(k: int) -> float:
        return (
            work.output_sqnr(store_weights(work.model, [stores[t] for t in order[k:]]))
            if k < len(order)
            else float("inf")
        )

    k = fewest_float(len(order) if work.opts.accuracy_aware else 0, sqnr_at, work.opts.storage_sqnr)
    chosen = set(order[k:])
    folds = bool(chosen) and same_optimized_graph(
        store_weights(work.model, [stores[t] for t in order[k:]]), work.model, subgraphs=True
    )
    if chosen and not folds:
        work.notes.append(
            "onnxruntime does not fold the int8-stored weights of recurrent or control-flow "
            "layers at load here: float weights kept for them"
        )
    for row, ws in work.outside:
        if "weight_storage" not in row:
            _label_outside(row, ws, alone, chosen, folds)
    if not chosen or not folds:
        return final
    stats["outside_int8_stored_layers"] = sum(r.get("weight_storage") == "int8" for r, _ in work.outside)
    stats["sqnr_outside_storage_db"] = round(sqnr_at(k), 2)
    return store_weights(final, [stores[t] for t in order[k:]])


def _outside_stores(work: Work) -> dict[str, WeightStore]:
    """The int8 storage of every weight of `work.outside` that may get it, by tensor; each layer's row
    is reported, with why its weights stay float where they must."""
    stores: dict[str, WeightStore] = {}
    for row, ws in work.outside:
        work.rows[row["node"]] = row
        if work.opts.weight_storage != "int8":
            row["weight_storage"] = "float (weight_storage=float)"
            continue
        if any(work.weight_array(t).size < INT8_STORAGE_MIN_ELEMENTS for t, _ in ws):
            row["weight_storage"] = f"float (fewer than {INT8_STORAGE_MIN_ELEMENTS} values)"
            continue
        for t, axis in ws:
            if t not in stores:
                stores[t] = weight_store(work, t, axis)
    return stores


def _label_outside(row: Row, ws: list[tuple[str, int]], alone: dict[str, float], chosen: set[str], folds: bool) -> None:
    """Say in `row` how the layer's weights are stored: int8, or float and why."""
    row["storage_sqnr_db"] = round(min(alone[t] for t, _ in ws), 2)
    if not chosen:
        row["weight_storage"] = "float (no weight met storage_sqnr)"
    elif not folds:
        row["weight_storage"] = UNFOLDED
    elif all(t in chosen for t, _ in ws):
        row["weight_storage"] = "int8"
    else:
        row["weight_storage"] = f"float (rounding alone {row['storage_sqnr_db']:.1f} dB)"
