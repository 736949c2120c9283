"""Constant folding: evaluate what depends only on constants, fold static shape arithmetic.

Per iteration, until nothing changes:
1. Constant nodes become initializers; Identity and inference-time Dropout go.
2. `If` nodes with a constant condition are replaced by the taken branch.
3. Shape arithmetic is folded from inferred static dimensions (partly known
   shapes too: a Reshape target with one dynamic entry becomes -1); dynamic
   axes are never frozen.
4. Nodes whose inputs are all constant are evaluated by onnxruntime in one
   batch per graph (falling back per node, then to `onnx.reference`).

Never folded: random ops, Q/DQ (their pattern is what runtimes fuse), ops of
non-standard domains, sequence/optional ops, and generators (ConstantOfShape,
Expand, Tile, Range) whose output would exceed `size_limit_mb`: the generator
stays and is reported, what follows it still folds where shapes allow.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt.graph import (cleanup, constant_value, detach, export_structure, iter_graphs, model_opsets,
                           output_owners, replace_all_uses, subgraphs_of, toposort, unique_name)
from onnxopt.pass_base import Pass, PassContext, PassResult, option
from onnxopt.qdq import INT8_STORAGE_MIN_ELEMENTS
from onnxopt.registry import register_pass
from onnxopt.runtime import make_session, session_options
from onnxopt.shape_values import evaluate as evaluate_shape_values
from onnxopt.shapes import infer_tensor_info
from onnxopt.weights import external_info, is_external

NEVER_FOLD = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt", "SequenceLength",
    "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
    "If", "Loop", "Scan",
}
GENERATORS = {"ConstantOfShape", "Expand", "Tile", "Range"}
STANDARD_DOMAINS = {"", "ai.onnx"}


def _expands_int8_weight(node: gs.Node) -> bool:
    """A Cast of a large int8/uint8 constant to a float type: int8 weight storage (as `quantize`
    writes it) that the runtime expands at load; folding it would undo the compression."""
    x = node.inputs[0] if node.op == "Cast" and node.inputs else None
    return (isinstance(x, gs.Constant) and np.dtype(x.dtype) in (np.dtype(np.int8), np.dtype(np.uint8))
            and int(np.prod(x.shape)) >= INT8_STORAGE_MIN_ELEMENTS
            and node.attrs.get("to") in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))


@register_pass("fold")
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static shape arithmetic; drop Identity, Dropout and dead nodes."""

    tolerance = "exact"

    @dataclass
    class Options:
        size_limit_mb: float = option(1.0, "never materialize a tensor larger than this from a generator "
                                           "(ConstantOfShape/Expand/Tile/Range); 0 = no limit")
        shapes: bool = option(True, "fold shape arithmetic from inferred static dimensions")
        cse: bool = option(True, "merge identical constants and nodes computing the same thing")
        max_iterations: int = option(10, "stop after this many rounds even if more could fold")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {"constant_nodes": 0, "identity_removed": 0, "if_inlined": 0, "shape_folded": 0,
                  "reshape_partial": 0, "folded_nodes": 0, "cse_merged": 0, "dead_nodes": 0}
        self._skipped: dict[str, dict[str, str]] = {}
        limit = int(self.options.size_limit_mb * 2**20) if self.options.size_limit_mb > 0 else None
        changed = False
        for _ in range(self.options.max_iterations):
            step = 0
            step += _constants_to_initializers(graph, counts)
            step += _remove_identities(graph, counts)
            step += _inline_constant_ifs(graph, counts)
            if self.options.shapes:
                step += _fold_shapes(graph, counts)
            step += self._fold_constants(graph, limit, counts)
            if self.options.cse:
                step += _eliminate_common_subexpressions(graph, counts)
            live = sum(1 for g in iter_graphs(graph) for n in g.nodes if n.outputs)
            cleanup(graph)
            dead = max(0, live - sum(len(g.nodes) for g in iter_graphs(graph)))
            counts["dead_nodes"] += dead
            step += dead
            if step == 0:
                break
            changed = True
        return PassResult(changed=changed, stats=counts, skipped=list(self._skipped.values()))

    def _skip(self, node: gs.Node, reason: str) -> None:
        self._skipped[node.name or id(node)] = {"node": node.name, "op": node.op, "reason": reason}

    def _fold_constants(self, graph: gs.Graph, limit: int | None, counts: dict) -> int:
        total = 0
        for g in list(iter_graphs(graph)):
            toposort(g)
            foldable = self._foldable_nodes(graph, g, limit)
            if foldable:
                total += self._evaluate(graph, g, foldable)
        counts["folded_nodes"] += total
        return total

    def _foldable_nodes(self, root: gs.Graph, g: gs.Graph, limit: int | None) -> list[gs.Node]:
        """Nodes of `g` computable from constants alone, in order, respecting the size policy."""
        pending: set[int] = set()
        out: list[gs.Node] = []
        owners = output_owners(root)
        for node in g.nodes:
            if not node.outputs or node.op in NEVER_FOLD or (node.domain or "") not in STANDARD_DOMAINS \
                    or subgraphs_of(node):
                continue
            if any(id(t) in owners for t in node.outputs) or _expands_int8_weight(node):
                continue
            ready = True
            for t in node.inputs:
                if not t.name or isinstance(t, gs.Constant):
                    continue
                if id(t) in pending:
                    if node.op in GENERATORS:
                        ready = False  # size known only once inputs are real constants: next round
                    continue
                ready = False
                break
            if not ready:
                continue
            if node.op in GENERATORS and limit is not None:
                size = _generator_bytes(node)
                if size is None or size > limit:
                    self._skip(node, f"output {'of unknown size' if size is None else f'{size / 2**20:.1f} MB'} "
                                     f"above size_limit_mb={limit / 2**20:g}: generator kept")
                    continue
            out.append(node)
            pending.update(id(t) for t in node.outputs)
        return out

    def _evaluate(self, root: gs.Graph, g: gs.Graph, nodes: list[gs.Node]) -> int:
        """Evaluate `nodes` (one batch, else one by one) and turn their used outputs into constants."""
        member = {id(n) for n in nodes}
        needed = [t for n in nodes for t in n.outputs
                  if t.name and any(id(c) not in member for c in t.outputs)]
        if not needed:
            return 0
        values = _run_batch(root, nodes, needed)
        if values is None:
            values = {}
            for n in nodes:
                if any(t.name and isinstance(t, gs.Variable) and id(t) not in values for t in n.inputs):
                    continue  # an input could not be evaluated
                got = _run_node(root, n, values)
                if got is None:
                    self._skip(n, "onnxruntime and onnx.reference could not evaluate it")
                    continue
                values.update(got)
        folded = 0
        for t in needed:
            if id(t) in values:
                t.to_constant(values[id(t)])
                t.inputs.clear()
        for n in nodes:
            if not any(isinstance(t, gs.Variable) for t in n.outputs):
                folded += 1
        return folded


def _constant_key(t: gs.Constant) -> tuple:
    """Content key of a constant; weights still in their TensorProto are hashed there (or, staged on
    disk, keyed by file and offset), never copied to numpy."""
    lazy = t._values
    if isinstance(lazy, LazyValues) and is_external(lazy.tensor):  # staged on disk: its place is its identity
        return (np.dtype(lazy.dtype).str, tuple(lazy.shape), external_info(lazy.tensor))
    if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
        return (np.dtype(lazy.dtype).str, tuple(lazy.shape), hashlib.sha1(lazy.tensor.raw_data).hexdigest())
    v = np.asarray(t.values)  # shape taken here: ascontiguousarray would make a scalar 1-D
    data = np.ascontiguousarray(v).view(np.uint8).reshape(-1) if v.size else b""
    return (v.dtype.str, v.shape, hashlib.sha1(data).hexdigest())


def _attr_key(value) -> object:
    if isinstance(value, gs.Constant):
        return ("tensor",) + _constant_key(value)
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def _eliminate_common_subexpressions(graph: gs.Graph, counts: dict) -> int:
    """Merge equal constants, then nodes with the same op, attributes and inputs (in topological order).

    Random ops, nodes with subgraphs and nodes producing a graph output are never merged.
    """
    owners = output_owners(graph)
    n = 0
    for g in iter_graphs(graph):
        canon: dict[tuple, gs.Constant] = {}
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant) and id(t) not in owners:
                    first = canon.setdefault(_constant_key(t), t)
                    if first is not t:
                        node.inputs[i] = first
        toposort(g)
        seen: dict[tuple, gs.Node] = {}
        for node in list(g.nodes):
            if not node.outputs or node.op in NEVER_FOLD - {"QuantizeLinear", "DequantizeLinear"} \
                    or subgraphs_of(node) or any(id(t) in owners for t in node.outputs):
                continue
            try:
                key = (node.op, node.domain or "", tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())),
                       tuple(id(t) if t.name else None for t in node.inputs), len(node.outputs))
                hash(key)
            except TypeError:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for mine, theirs in zip(list(node.outputs), list(first.outputs)):
                replace_all_uses(graph, mine, theirs, owners)
            detach(node)
            n += 1
    counts["cse_merged"] += n
    return n


def _generator_bytes(node: gs.Node) -> int | None:
    """Bytes the generator would produce, from its (constant) inputs."""
    vals = [constant_value(t) if t.name else None for t in node.inputs]
    try:
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            item = value.values.dtype.itemsize if isinstance(value, gs.Constant) else 4
            return int(np.prod(vals[0])) * item
        if node.op == "Expand":
            shape = np.broadcast_shapes(vals[0].shape, tuple(int(v) for v in vals[1]))
            return int(np.prod(shape)) * vals[0].dtype.itemsize
        if node.op == "Tile":
            return int(vals[0].size * np.prod(vals[1])) * vals[0].dtype.itemsize
        if node.op == "Range":
            start, stop, delta = (np.asarray(v).item() for v in vals[:3])
            return max(0, int(np.ceil((stop - start) / delta))) * np.asarray(vals[0]).dtype.itemsize
    except Exception:
        return None
    return None


def _standalone_model(root: gs.Graph, nodes: list[gs.Node], outputs: list[str],
                      feeds: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model computing `outputs` with `nodes`: constant inputs become initializers, `feeds` inputs.

    Built as protos from the gs nodes without touching them (a gs.Node wired to the
    real tensors would change their use-def lists).
    """
    feeds = feeds or {}
    protos = [OnnxExporter.export_node(n) for n in nodes]
    inits, seen = [], set(feeds)
    for n in nodes:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                inits.append(OnnxExporter.export_tensor_proto(t))
    graph = onnx.helper.make_graph(
        protos, "fold", [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                         for k, v in feeds.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    opsets = model_opsets(root)
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=max(root._onnxopt_ir_version or 0, 7)
                                  if hasattr(root, "_onnxopt_ir_version") else 8)


def _session_run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> list | None:
    """Run with onnxruntime (optimizations off, to compute exactly what the graph says)."""
    sess = make_session(model, so=session_options(1, optimize=False))
    return sess.run(outputs, feeds)


def _run_batch(root: gs.Graph, nodes: list[gs.Node], needed: list[gs.Tensor]) -> dict[int, np.ndarray] | None:
    names = [t.name for t in needed]
    try:
        results = _session_run(_standalone_model(root, nodes, names), names, {})
    except Exception:
        return None
    if not all(isinstance(r, np.ndarray) for r in results):
        return None
    return {id(t): r for t, r in zip(needed, results)}


def _run_node(root: gs.Graph, node: gs.Node, known: dict[int, np.ndarray]) -> dict[int, np.ndarray] | None:
    """Evaluate one node with onnxruntime, else `onnx.reference`; inputs from constants or `known`."""
    feeds = {t.name: known[id(t)] for t in node.inputs if t.name and id(t) in known}
    outputs = [t for t in node.outputs if t.name]
    names = [t.name for t in outputs]
    try:
        model = _standalone_model(root, [node], names, feeds)
    except Exception:
        return None
    try:
        results = _session_run(model, names, feeds)
    except Exception:
        try:
            from onnx.reference import ReferenceEvaluator

            results = ReferenceEvaluator(model).run(names, feeds)
        except Exception:
            return None
    if not all(isinstance(r, np.ndarray) for r in results):
        return None
    return {id(t): np.asarray(r) for t, r in zip(outputs, results)}


def _constants_to_initializers(graph: gs.Graph, counts: dict) -> int:
    """Turn `Constant` nodes into initializers (except where they produce a graph output)."""
    n = 0
    owners = output_owners(graph)
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.op != "Constant" or node.inputs or not node.outputs:
                continue
            out = node.outputs[0]
            if id(out) in owners:
                continue
            value = _constant_attr_value(node)
            if value is None:
                continue
            out.to_constant(value)
            out.inputs.clear()
            n += 1
    counts["constant_nodes"] += n
    return n


def _constant_attr_value(node: gs.Node) -> np.ndarray | None:
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return a["value"].values
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    return None


def _remove_identities(graph: gs.Graph, counts: dict) -> int:
    """Bypass Identity and inference-time Dropout (when its mask is unused)."""
    n = 0
    owners = output_owners(graph)
    for g in iter_graphs(graph):
        for node in list(g.nodes):
            if node.op == "Identity":
                pass
            elif node.op == "Dropout" and not (len(node.outputs) > 1 and node.outputs[1].outputs) \
                    and _dropout_is_inference(node):
                pass
            else:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if id(out) in owners:
                if not _hand_output_name_to_producer(graph, g, src, out, owners):
                    continue  # the output name must stay and nothing else can carry it
            else:
                replace_all_uses(graph, out, src, owners)
            detach(node)
            n += 1
    counts["identity_removed"] += n
    return n


def _hand_output_name_to_producer(graph: gs.Graph, g: gs.Graph, src: gs.Tensor, out: gs.Tensor,
                                  owners: dict[int, gs.Graph]) -> bool:
    """Let the producer of `src` (in graph `g`) produce the graph output `out` directly.

    Keeps the output's name (the signature) while removing the Identity in front of it;
    other consumers of `src` then read `out`. Not possible when `src` is itself a graph
    input or output, a constant, or comes from an enclosing graph.
    """
    p = src.inputs[0] if src.inputs else None
    if p is None or isinstance(src, gs.Constant) or id(src) in owners \
            or any(i is src for i in g.inputs) or not any(n is p for n in g.nodes):
        return False
    for consumer in list(src.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is src:
                consumer.inputs[i] = out
    out.inputs.clear()
    k = next(i for i, t in enumerate(p.outputs) if t is src)
    p.outputs[k] = out
    return True


def _dropout_is_inference(node: gs.Node) -> bool:
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = constant_value(node.inputs[2])
        return v is not None and not bool(np.asarray(v).item())
    return True


def _inline_constant_ifs(graph: gs.Graph, counts: dict) -> int:
    """Replace `If` nodes whose condition is a constant by the nodes of the taken branch."""
    n = 0
    for g in list(iter_graphs(graph)):
        for node in list(g.nodes):
            if node.op != "If":
                continue
            cond = constant_value(node.inputs[0])
            if cond is None:
                continue
            branch = node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
            if len(branch.outputs) != len(node.outputs):
                continue
            g.nodes.extend(branch.nodes)
            for inner, outer in zip(list(branch.outputs), list(node.outputs)):
                replace_all_uses(graph, outer, inner)
            branch.nodes.clear()
            branch.outputs.clear()
            detach(node)
            n += 1
    counts["if_inlined"] += n
    return n


def _fold_shapes(graph: gs.Graph, counts: dict) -> int:
    """Replace fully known shape values by constants; give Reshape a -1 for its one dynamic entry."""
    info = infer_tensor_info(export_structure(graph))
    values = evaluate_shape_values(graph.nodes, info)
    owners = output_owners(graph)
    n = 0
    for node in list(graph.nodes):
        if not node.outputs or id(node.outputs[0]) in owners:
            continue
        out = node.outputs[0]
        v = values.get(id(out))
        if v is not None and v.known and node.op not in ("Constant",) and isinstance(out, gs.Variable) \
                and len(node.outputs) == 1:
            dtype = np.int32 if node.op == "Cast" and node.attrs.get("to") == 6 else np.int64
            out.to_constant(v.array(dtype))
            out.inputs.clear()
            n += 1
            counts["shape_folded"] += 1
    for node in graph.nodes:
        if node.op != "Reshape" or len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant):
            continue
        v = values.get(id(node.inputs[1]))
        if v is None or v.scalar:
            continue
        target = _reshape_target(v.items, info.get(node.inputs[0].name), node.attrs.get("allowzero", 0))
        if target is not None:
            node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name or 'reshape'}_shape"), target)
            n += 1
            counts["reshape_partial"] += 1
    return n


def _reshape_target(items: tuple, data_info, allowzero: int) -> np.ndarray | None:
    """A constant Reshape target equivalent to partly known `items`, or None.

    An unknown entry equal to the data's own dimension at that index (same
    symbol) becomes 0 ("copy", when allowzero is off); one remaining unknown
    becomes -1 (inferred from the element count). Dynamic sizes stay dynamic.
    """
    if sum(not isinstance(d, int) for d in items) == 1 and -1 not in items:
        return np.array([d if isinstance(d, int) else -1 for d in items], dtype=np.int64)
    dims = data_info.shape if data_info is not None and data_info.shape is not None else ()
    out: list[int | None] = []
    for i, d in enumerate(items):
        if isinstance(d, int):
            out.append(d)
        elif not allowzero and i < len(dims) and isinstance(dims[i], str) and getattr(d, "label", None) == dims[i]:
            out.append(0)
        else:
            out.append(None)
    unknown = [i for i, d in enumerate(out) if d is None]
    if len(unknown) > 1 or (unknown and -1 in out):
        return None
    return np.array([-1 if d is None else d for d in out], dtype=np.int64)
