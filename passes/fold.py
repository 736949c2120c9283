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
from onnxopt.kernels import int_arith
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
#: A constant at least this large that other nodes also read is not folded through an op whose output is as
#: large as its input: the result would be a second copy next to the first (e.g. Unsqueeze(W) in both
#: branches of an If turned one LSTM weight into two).
SHARED_COPY_BYTES = 16 * 1024
#: Ops whose output is small whatever their input: folding them copies nothing.
_SMALL_OUTPUT = {"Shape", "Size", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean", "ReduceProd", "ArgMax",
                 "ArgMin"}
STANDARD_DOMAINS = {"", "ai.onnx"}


def _expands_int8_weight(node: gs.Node) -> bool:
    """A Cast of a large int8/uint8 constant to a float type: int8 weight storage (as `quantize`
    writes it) that the runtime expands at load; folding it would undo the compression."""
    x = node.inputs[0] if node.op == "Cast" and node.inputs else None
    return (isinstance(x, gs.Constant) and _exact_in_numpy(x.dtype)
            and np.dtype(x.dtype) in (np.dtype(np.int8), np.dtype(np.uint8))
            and int(np.prod(x.shape)) >= INT8_STORAGE_MIN_ELEMENTS
            and node.attrs.get("to") in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))


@register_pass("fold")
class FoldConstants(Pass):
    """Evaluate constant subgraphs and static shape arithmetic; drop Identity, Dropout and dead nodes."""

    tolerance = "exact"

    @dataclass
    class Options:
        size_limit_mb: float = option(1.0, "never materialize a tensor larger than this from a generator "
                                           "(ConstantOfShape/Expand/Tile/Range); 0 = no limit", low=0)
        shapes: bool = option(True, "fold shape arithmetic from inferred static dimensions")
        cse: bool = option(True, "merge identical constants and nodes computing the same thing")
        max_iterations: int = option(10, "stop after this many rounds even if more could fold", low=1)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        counts = {"constant_nodes": 0, "identity_removed": 0, "if_inlined": 0, "shape_folded": 0,
                  "reshape_partial": 0, "folded_nodes": 0, "cse_merged": 0, "dead_nodes": 0}
        self._skipped: dict[str, dict[str, str]] = {}
        limit = _size_limit_bytes(self.options.size_limit_mb)
        bytes_before = _constant_bytes(graph)
        changed = False
        for _ in range(self.options.max_iterations):
            step = 0
            step += _constants_to_initializers(graph, counts)
            info = None
            if self.options.shapes:
                redundant, info = _eliminate_redundant_nodes(graph, counts)
                step += redundant
            edits = _remove_identities(graph, counts) + _inline_constant_ifs(graph, counts)
            step += edits
            if self.options.shapes:  # the shapes inferred above still hold when nothing changed since
                step += _fold_shapes(graph, counts, info if not (redundant or edits) else None)
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
        grown = _constant_bytes(graph) - bytes_before
        if grown > 0:  # folded generators (Tile, Expand...) can be larger than what computed them
            counts["constant_bytes_added"] = grown
        overridable = getattr(graph, "_onnxopt_overridable", {})
        for t in graph.inputs:
            if t.name in overridable and t.outputs:
                self._skipped[t.name] = {"node": t.name, "op": "initializer",
                                         "reason": "overridable initializer (also a graph input): kept as an "
                                                   "input, not folded in as a constant"}
        return PassResult(changed=changed, stats=counts, skipped=list(self._skipped.values()),
                          reason="" if changed else "nothing left to fold: no constant subgraph, Identity, "
                                                    "constant If, shape computation or duplicate node")

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
                    or subgraphs_of(node) or node.op == "Constant":  # a Constant left as a node is sparse
                continue
            reason = _inexact_reason(node)
            if reason is not None:
                self._skip(node, reason)
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
            if ready and node.op == "Div" and any(id(t) in pending and not _is_float(t) for t in node.inputs):
                ready = False  # an integer division is checked for traps on real constants: next round
            if not ready:
                continue
            if node.op == "Div" and len(node.inputs) == 2 \
                    and int_arith.division_traps(*(constant_value(t) for t in node.inputs)):
                self._skip(node, "integer division by zero (or of the minimum by -1): left for the runtime")
                continue
            if node.op in GENERATORS and limit is not None:
                size = _generator_bytes(node)
                if size is None or size > limit:
                    self._skip(node, f"output {'of unknown size' if size is None else f'{size / 2**20:.1f} MB'} "
                                     f"above size_limit_mb={limit / 2**20:g}: generator kept")
                    continue
            out.append(node)
            pending.update(id(t) for t in node.outputs)
        return self._without_copies(out)

    def _without_copies(self, nodes: list[gs.Node]) -> list[gs.Node]:
        """`nodes` (in order) less those whose folded output would be a copy of a large constant that stays:
        one that a node not folded now also reads (in this graph or another body), and what depends on them.
        When every reader folds (the slices of one weight), the constant goes and nothing is copied."""
        while True:
            members = {id(n) for n in nodes}
            drop = {id(n): t for n in nodes if (t := _shared_large_input(n, members)) is not None}
            if not drop:
                return nodes
            dead: set[int] = set()
            kept = []
            for n in nodes:
                if id(n) in drop or any(id(t) in dead for t in n.inputs):
                    dead.update(id(t) for t in n.outputs)
                    if id(n) in drop:
                        t = drop[id(n)]
                        self._skip(n, f"would copy the constant '{t.name}' ({_nbytes(t) // 1024} KB), which "
                                      f"{len({id(c) for c in t.outputs})} nodes read: left for the runtime")
                    continue
                kept.append(n)
            nodes = kept

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
                v = values[id(t)]
                if v.dtype.kind in "OSU":  # strings: gs writes numpy strings wrongly, the ONNX form is exact
                    v = LazyValues(onnx.numpy_helper.from_array(v, t.name))
                t.to_constant(v)
                t.inputs.clear()
        for n in nodes:
            if not any(isinstance(t, gs.Variable) for t in n.outputs):
                folded += 1
        return folded


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of every constant of the model (initializers and Constant values, from their metadata)."""
    seen: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    seen[id(t)] = t
            v = node.attrs.get("value") if node.op == "Constant" else None
            if isinstance(v, gs.Constant):
                seen[id(v)] = v
    total = 0
    for t in seen.values():
        lazy = t._values
        if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
            total += len(lazy.tensor.raw_data)
        else:
            total += _nbytes(t)
    return total


def _size_limit_bytes(size_limit_mb: float) -> int | None:
    """`size_limit_mb` in bytes; None = no limit (0 or +inf). NaN or a negative size (not valid options,
    rejected when options are parsed) keep every generator rather than fail."""
    if size_limit_mb == 0 or size_limit_mb == float("inf"):
        return None
    if not size_limit_mb > 0:
        return 0
    return int(size_limit_mb * 2**20)


def _is_float(t: gs.Tensor) -> bool:
    """True when `t` is known to hold floating-point values (from its declared type)."""
    try:
        return t.dtype is not None and np.dtype(t.dtype).kind == "f"
    except TypeError:
        return False


def _constant_key(t: gs.Constant) -> tuple:
    """Content key of a constant; weights still in their TensorProto are hashed there (or, staged on
    disk, keyed by file and offset), never copied to numpy."""
    lazy = t._values
    if isinstance(lazy, LazyValues) and is_external(lazy.tensor):  # staged on disk: its place is its identity
        return (_dtype_key(lazy), tuple(lazy.shape), external_info(lazy.tensor))
    if isinstance(lazy, LazyValues) and lazy.tensor.HasField("raw_data"):
        return (_dtype_key(lazy), tuple(lazy.shape), hashlib.sha1(lazy.tensor.raw_data).hexdigest())
    if isinstance(lazy, LazyValues):  # typed fields (strings, int32_data...): hashed as stored, never loaded
        data = onnx.TensorProto()
        data.CopyFrom(lazy.tensor)
        data.name = ""
        digest = hashlib.sha1(data.SerializeToString(deterministic=True)).hexdigest()
        return (_dtype_key(lazy), tuple(lazy.shape), digest)
    v = np.asarray(t.values)  # shape taken here: ascontiguousarray would make a scalar 1-D
    if v.dtype.kind in "OSU":  # strings: hashed in their ONNX form
        data = onnx.numpy_helper.from_array(v).SerializeToString(deterministic=True)
    else:
        data = np.ascontiguousarray(v).view(np.uint8).reshape(-1) if v.size else b""
    return (v.dtype.str, v.shape, hashlib.sha1(data).hexdigest())


def _dtype_key(lazy: LazyValues) -> object:
    return np.dtype(lazy.dtype).str if _exact_in_numpy(lazy.dtype) else ("onnx", lazy.tensor.data_type)


def _exact_in_numpy(dtype) -> bool:
    """True when numpy holds values of this (gs) dtype exactly: bool, integers, IEEE floats, complex,
    strings. bfloat16, float8, int4... are ONNX element types gs reports as numbers or converts lossily."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return False
    return dt.kind in "biufcOSU" and dt.isbuiltin == 1  # ml_dtypes' bfloat16/float8/int4 are not built in


def _onnx_type_exact(elem_type: int | None) -> bool:
    """`_exact_in_numpy` for an ONNX element type (e.g. a Cast's `to`)."""
    try:
        return elem_type is not None and _exact_in_numpy(onnx.helper.tensor_dtype_to_np_dtype(int(elem_type)))
    except (KeyError, ValueError, TypeError):
        return False


def _inexact_reason(node: gs.Node) -> str | None:
    """Why `node` is not evaluated through numpy: an input or output of an element type numpy cannot hold
    exactly (bfloat16, float8, int4/uint4, float4); folding such values would also expand compact storage."""
    for t in node.inputs:
        if isinstance(t, gs.Constant) and (not _exact_in_numpy(t.dtype) or (
                isinstance(t._values, LazyValues) and not _onnx_type_exact(t._values.tensor.data_type))):
            return f"input {t.name!r} has an element type numpy cannot hold exactly: left as is"
    target = None
    if node.op == "Cast":
        target = node.attrs.get("to")
    elif node.op == "CastLike" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        lazy = node.inputs[1]._values
        target = lazy.tensor.data_type if isinstance(lazy, LazyValues) else None
    elif node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
        lazy = node.attrs["value"]._values
        target = lazy.tensor.data_type if isinstance(lazy, LazyValues) else None
    if target is not None and not _onnx_type_exact(target):
        return "output of an element type numpy cannot hold exactly: left as is"
    return None


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


def _shared_large_input(node: gs.Node, folding: set[int]) -> gs.Constant | None:
    """A constant input of `node` of at least SHARED_COPY_BYTES that a node outside `folding` (ids of the
    nodes folded together, in one graph) also reads, in any graph: folding `node` would write its output
    next to a constant that stays (None: folding copies nothing)."""
    if node.op in _SMALL_OUTPUT:
        return None
    for t in node.inputs:
        if isinstance(t, gs.Constant) and _nbytes(t) >= SHARED_COPY_BYTES \
                and any(id(c) not in folding for c in t.outputs):
            return t
    return None


def _nbytes(t: gs.Constant) -> int:
    """A constant's size from its metadata (its values are not loaded)."""
    if t.shape is None:
        return 0
    return int_arith.product(t.shape) * (np.dtype(t.dtype).itemsize if _exact_in_numpy(t.dtype) else 1)


def _generator_bytes(node: gs.Node) -> int | None:
    """Bytes the generator would produce, from its (constant) inputs."""
    vals = [constant_value(t) if t.name else None for t in node.inputs]
    try:
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            item = value.values.dtype.itemsize if isinstance(value, gs.Constant) else 4
            return int_arith.product(vals[0].reshape(-1)) * item
        if node.op == "Expand":
            shape = np.broadcast_shapes(vals[0].shape, tuple(int(v) for v in vals[1]))
            return int_arith.product(shape) * vals[0].dtype.itemsize
        if node.op == "Tile":
            return vals[0].size * int_arith.product(vals[1].reshape(-1)) * vals[0].dtype.itemsize
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


def _constant_attr_value(node: gs.Node) -> np.ndarray | LazyValues | None:
    """The value of a `Constant` node, exactly as stored (a tensor attribute keeps its TensorProto, so
    bfloat16, float8, int4 and string values are not converted); None for a sparse value (kept as is)."""
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        v = a["value"]
        lazy = v._values  # numbers numpy holds exactly become arrays (written as raw bytes, like every weight)
        if isinstance(lazy, LazyValues) and (not _onnx_type_exact(lazy.tensor.data_type)
                                             or lazy.tensor.data_type == onnx.TensorProto.STRING):
            return lazy
        return v.values
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    if "value_string" in a or "value_strings" in a:
        strings = [a["value_string"]] if "value_string" in a else list(a["value_strings"])
        data = [s.encode() if isinstance(s, str) else bytes(s) for s in strings]
        dims = [] if "value_string" in a else [len(data)]
        return LazyValues(onnx.helper.make_tensor(node.outputs[0].name, onnx.TensorProto.STRING, dims, data))
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
            cond = constant_value(node.inputs[0]) if node.inputs else None
            if cond is None or np.asarray(cond).size != 1:
                continue
            taken = bool(np.asarray(cond).reshape(-1)[0])
            branch, other = (node.attrs[k] for k in (("then_branch", "else_branch") if taken
                                                     else ("else_branch", "then_branch")))
            if len(branch.outputs) != len(node.outputs):
                continue
            for sub in iter_graphs(other):  # the branch never taken stops reading outer tensors
                for dropped in list(sub.nodes):
                    detach(dropped)
            _rename_clashing(graph, branch)
            g.nodes.extend(branch.nodes)
            for inner, outer in zip(list(branch.outputs), list(node.outputs)):
                replace_all_uses(graph, outer, inner)
            branch.nodes.clear()
            branch.outputs.clear()
            detach(node)
            n += 1
    counts["if_inlined"] += n
    return n


def _rename_clashing(graph: gs.Graph, branch: gs.Graph) -> None:
    """Before `branch` is inlined: rename its nodes and its own tensors whose names are used elsewhere in
    the model (the other branch, sibling bodies, the enclosing graph), so names stay unique once it
    joins the enclosing graph. Tensors it shares with the enclosing scope keep their names."""
    inner = {id(sub) for sub in iter_graphs(branch)}
    node_names: set[str] = set()
    tensor_names: set[str] = set()
    outside: set[int] = set()
    for sub in iter_graphs(graph):
        if id(sub) in inner:
            continue
        node_names.update(n.name for n in sub.nodes)
        used = [t for n in sub.nodes for t in list(n.inputs) + list(n.outputs)]
        for t in list(sub.inputs) + list(sub.outputs) + used:
            tensor_names.add(t.name)
            outside.add(id(t))
    for sub in iter_graphs(branch):
        for n in sub.nodes:
            if n.name in node_names:
                old, n.name = n.name, unique_name(graph, n.name)
                docs = getattr(graph, "_onnxopt_node_docs", None)  # doc strings are kept by node name
                if docs is not None and old in docs:
                    docs[n.name] = docs[old]
            for t in list(n.inputs) + list(n.outputs):
                if t.name and t.name in tensor_names and id(t) not in outside:
                    t.name = unique_name(graph, t.name)


def _fold_shapes(graph: gs.Graph, counts: dict, info: dict | None = None) -> int:
    """Replace fully known shape values by constants; give Reshape a -1 for its one dynamic entry.

    `info`: tensor shapes inferred on the graph as it is now, when the caller has them."""
    if info is None:
        info = infer_tensor_info(export_structure(graph))
    owners = output_owners(graph)
    n = 0
    # bodies too: a body reading the shape of an outer tensor the main graph knows (an If whose condition
    # is a static dim of a graph input) folds like the main graph; a body's own tensors stay unknown
    for g in iter_graphs(graph):
        values = evaluate_shape_values(g.nodes, info)
        for node in list(g.nodes):
            if not node.outputs or id(node.outputs[0]) in owners:
                continue
            out = node.outputs[0]
            v = values.get(id(out))
            if v is not None and v.known and node.op not in ("Constant",) and isinstance(out, gs.Variable) \
                    and len(node.outputs) == 1:
                declared = info.get(out.name)
                if declared is not None and declared.dtype is not None and np.dtype(declared.dtype) != v.dtype:
                    continue  # inference and the abstract value disagree on the type: leave it to the runtime
                out.to_constant(v.array())
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


# Exact eliminations (as onnxslim's): no-op nodes, merged view chains. Shape facts come from
# inference over the main graph, so with pinned input shapes (`--input-shape`) more of them apply.

_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_INT64_MAX = int(np.iinfo(np.int64).max)


def _eliminate_redundant_nodes(graph: gs.Graph, counts: dict) -> tuple[int, dict | None]:
    """Rewrite nodes of the main graph that shape inference proves redundant; returns how many, and the
    inferred shapes (of the graph before those rewrites; None when there was nothing to look at).

    - a no-op becomes an Identity (which `_remove_identities` then bypasses): Cast/CastLike to the
      input's own type, Expand to a shape the input already has, Slice keeping every element,
      Concat of one input, Transpose by the identity permutation, Pad by zeros, Reshape to the
      input's own static shape;
    - a Reshape of a view (Reshape/Flatten/Squeeze/Unsqueeze) reads the view's input, when its
      target copies no dim (no 0 entry) or its output shape is static (the target becomes it);
    - an Unsqueeze of an Unsqueeze becomes one Unsqueeze;
    - a Transpose that only moves size-1 axes, next to a Reshape, becomes a Reshape (then merged).
    """
    candidates = {"Cast", "CastLike", "Expand", "Slice", "Concat", "Transpose", "Pad", "Reshape", "Unsqueeze"}
    if not any(n.op in candidates and not n.domain for n in graph.nodes):
        return 0, None
    info = infer_tensor_info(export_structure(graph))
    opset = next((int(o.version) for o in model_opsets(graph) if o.domain in ("", "ai.onnx")), 0)
    toposort(graph)
    members = {id(node) for node in graph.nodes}
    n = 0
    for node in list(graph.nodes):
        if node.op not in candidates or node.domain or len(node.outputs) != 1 or not node.inputs \
                or not node.inputs[0].name:
            continue
        if node.op == "Reshape" and _merge_reshape_of_view(graph, node, info, members):
            n += 1
        elif node.op == "Unsqueeze":
            n += _merge_unsqueezes(graph, node, info, opset, members)
        elif _is_noop(node, info, opset):
            _to_identity(node)
            n += 1
        elif node.op == "Transpose":
            n += _transpose_to_reshape(graph, node, info)
    counts["redundant_removed"] = counts.get("redundant_removed", 0) + n
    return n, info


def _shape_of(t: gs.Tensor, info: dict) -> tuple | None:
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    ti = info.get(t.name)
    return ti.shape if ti is not None else None


def _to_identity(node: gs.Node) -> None:
    x = node.inputs[0]
    node.inputs.clear()
    node.inputs.append(x)
    node.op, node.attrs = "Identity", {}


def _const_ints(node: gs.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as input `index` (a constant) or, in older opsets, as attribute `attr`."""
    if len(node.inputs) > index and node.inputs[index].name:
        v = constant_value(node.inputs[index])
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    if attr in node.attrs:
        return [int(x) for x in node.attrs[attr]]
    return None


def _is_noop(node: gs.Node, info: dict, opset: int) -> bool:
    """True when `node` returns its first input unchanged (value, dtype and shape)."""
    x = node.inputs[0]
    shape = _shape_of(x, info)
    if node.op in ("Cast", "CastLike"):
        src = info.get(x.name)
        to = node.attrs.get("to") if node.op == "Cast" else (
            info[node.inputs[1].name].elem_type if len(node.inputs) > 1 and node.inputs[1].name in info else None)
        return src is not None and bool(src.elem_type) and src.elem_type == to
    if node.op == "Concat":
        return len(node.inputs) == 1
    if shape is None:
        return False
    if node.op == "Expand":
        target = _const_ints(node, 1, "")
        return target is not None and len(target) <= len(shape) and all(
            t == 1 or d == t for t, d in zip(reversed(target), reversed(shape)))
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return list(perm) == list(range(len(shape))) if perm is not None else len(shape) <= 1
    if node.op == "Pad":
        pads = _const_ints(node, 1, "pads" if opset < 11 else "")
        return pads is not None and not any(pads)
    if node.op == "Reshape":
        out = _shape_of(node.outputs[0], info)
        return out is not None and tuple(out) == tuple(shape) and all(isinstance(d, int) for d in shape)
    if node.op == "Slice":
        return _slice_keeps_all(node, shape, opset)
    return False


def _slice_keeps_all(node: gs.Node, shape: tuple, opset: int) -> bool:
    starts, ends = (_const_ints(node, 1, "starts"), _const_ints(node, 2, "ends")) if opset >= 10 else \
        (node.attrs.get("starts"), node.attrs.get("ends"))
    if starts is None or ends is None or len(starts) != len(ends):
        return False
    axes = _const_ints(node, 3, "") if opset >= 10 else node.attrs.get("axes")
    steps = _const_ints(node, 4, "") if opset >= 10 else None
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    if len(axes) != len(starts) or len(steps) != len(starts):
        return False
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis + len(shape) if axis < 0 else axis
        if step != 1 or not 0 <= axis < len(shape):
            return False
        dim = shape[axis]
        if isinstance(dim, int):
            start, end = (start + dim if start < 0 else start), (end + dim if end < 0 else end)
            if start > 0 or end < dim:
                return False
        elif start != 0 or end < _INT64_MAX:  # unknown size: only "from 0 to the end" keeps everything
            return False
    return True


def _moves_unit_axes_only(node: gs.Node, info: dict) -> bool:
    """A Transpose whose non-1 axes keep their order: the same memory layout as a Reshape."""
    shape = _shape_of(node.inputs[0], info)
    perm = node.attrs.get("perm")
    if shape is None or perm is None or any(d == 0 for d in shape) or list(perm) == list(range(len(shape))):
        return False
    real = [p for p in perm if not (isinstance(shape[p], int) and shape[p] == 1)]
    return real == sorted(real) and sum(not isinstance(shape[p], int) for p in perm) <= 1


def _transpose_to_reshape(graph: gs.Graph, node: gs.Node, info: dict) -> bool:
    """Replace a Transpose that moves only size-1 axes by a Reshape, when a Reshape is next to it."""
    x = node.inputs[0]
    near = [p.op for p in x.inputs] + [c.op for c in node.outputs[0].outputs]
    if "Reshape" not in near or not _moves_unit_axes_only(node, info):
        return False
    shape = _shape_of(x, info)
    target = np.array([shape[p] if isinstance(shape[p], int) else -1 for p in node.attrs["perm"]], dtype=np.int64)
    node.op, node.attrs = "Reshape", {}
    node.inputs.append(gs.Constant(unique_name(graph, f"{node.name or 'transpose'}_as_reshape"), target))
    return True


def _merge_reshape_of_view(graph: gs.Graph, node: gs.Node, info: dict, members: set[int]) -> bool:
    """Reshape(view(x)) -> Reshape(x): a Reshape depends only on its input's element count, unless a 0
    in its target copies a dim of that input (then a static output shape is used as the target)."""
    t = node.inputs[0]
    view = t.inputs[0] if len(t.inputs) == 1 else None
    if view is None or view.op not in _VIEW_OPS or view.domain or not view.inputs \
            or id(view) not in members or len(node.inputs) < 2:
        return False
    target = constant_value(node.inputs[1])
    if target is None:
        return False
    target = np.asarray(target).reshape(-1)
    if (target == 0).any() and not node.attrs.get("allowzero", 0):
        out = _shape_of(node.outputs[0], info)
        if out is None or not all(isinstance(d, int) and d > 0 for d in out):
            return False
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name or 'reshape'}_shape"),
                                     np.array(out, dtype=np.int64))
    node.inputs[0] = view.inputs[0]
    return True


def _merge_unsqueezes(graph: gs.Graph, node: gs.Node, info: dict, opset: int, members: set[int]) -> bool:
    """Unsqueeze(Unsqueeze(x, a1), a2) -> Unsqueeze(x, a): the final positions of all inserted axes."""
    t = node.inputs[0]
    first = t.inputs[0] if len(t.inputs) == 1 else None
    if first is None or first.op != "Unsqueeze" or first.domain or id(first) not in members:
        return False
    a1, a2 = _const_ints(first, 1, "axes"), _const_ints(node, 1, "axes")
    if a1 is None or a2 is None:
        return False
    out_rank = None
    if any(a < 0 for a in a1 + a2):
        shape = _shape_of(first.inputs[0], info)
        if shape is None:
            return False
        out_rank = len(shape) + len(a1) + len(a2)
        a1 = [a + out_rank - len(a2) if a < 0 else a for a in a1]
        a2 = [a + out_rank if a < 0 else a for a in a2]
    second = set(a2)
    kept = [p for p in range(len(a1) + len(a2) + max(a1 + a2) + 1) if p not in second]
    axes = sorted(second | {kept[a] for a in a1})
    if out_rank is not None and axes and axes[-1] >= out_rank:
        return False
    node.inputs[0] = first.inputs[0]
    if opset >= 13:
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name or 'unsqueeze'}_axes"),
                                     np.array(axes, dtype=np.int64))
    else:
        node.attrs["axes"] = axes
    return True
