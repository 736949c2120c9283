"""The graph toolkit for pass authors: everything a rewrite pass needs, under one public name.

A pass gets an onnx-graphsurgeon graph (`gs.Graph`) whose use-def links
(`tensor.inputs` = its producer, `tensor.outputs` = its consumers) are kept in
sync by gs. Write passes with these helpers and the names `onnxopt` exports
(`Pass`, `PassResult`, `PassContext`, `option`, `register_pass`); everything else
in onnxopt is internal and may move. The rules:

- **Removing nodes.** `detach(node)` disconnects a node from its tensors; the pass
  manager drops detached nodes and unused tensors once after every pass that says
  it changed the graph (`cleanup` walks the whole graph: never call it per node).
- **Rewiring.** `replace_all_uses(graph, old, new)` makes every consumer of `old`
  read `new`, consumers inside If/Loop/Scan bodies included. gs's `node.inputs` /
  `node.outputs` are synchronized lists that reject slice assignment
  (`node.inputs[:] = ...` raises): assign by index (`node.inputs[i] = t`) or
  `clear()` then `extend()`.
- **Graph outputs are never renamed.** Their names are the model's signature and the
  save gate refuses a model whose signature changed. `replace_all_uses` keeps a graph
  output's name (it re-creates it with an Identity reading `new`); never set
  `tensor.name` on a graph output, and never remove one.
- **New names.** `unique_name(graph, base)` gives a tensor or node name unused in the
  graph and all its bodies. `new_constant(graph, name, values)` creates a weight
  (large ones spill to disk at once in big models).
- **Control flow.** `iter_graphs(graph)` yields the graph and every If/Loop/Scan body,
  outermost first; `subgraphs_of(node)` a node's bodies. A body may read tensors of
  an enclosing graph. A pass works inside bodies or says in its result that it
  skipped them: nothing is silently a no-op.
- **Constants.** `is_constant(t)` is true for initializers and Constant-node outputs;
  `constant_value(t)` is their numpy value (else None); `constant_shape(t)` their shape
  without loading the values; `producer(t)` the node computing `t` (None for inputs and
  initializers).
- **The result.** Return `PassResult(changed=..., stats=..., reason=...)`: `changed`
  must be honest (the pass contract compares it with `graph_hash` before and after)
  and a pass that changed nothing says why in `reason`.
- **Tolerance.** A pass whose rewrite changes the numbers declares it with the class
  attribute `tolerance`: "exact" (the default: outputs equal to float rounding),
  "approximate" (judged by cosine similarity, as prune and lowrank are) or "quantize"
  (judged by SQNR); `--check` and `validate` use the loosest class of the pipeline
  (thresholds in `onnxopt.verify.tolerance.Tolerance`).
- **Analyses.** `ctx.analysis("shapes", graph)` returns `dict[str, TensorInfo]`: for
  every tensor name of the main graph (inputs, intermediate values, outputs,
  initializers, Constant outputs) its element type (`elem_type`, an
  `onnx.TensorProto` code; `.dtype` as numpy) and its `shape`, a tuple of dims that are
  ints, symbolic names (str) or None (unknown), or None for an unknown rank; `.static`
  is true when every dim is an int. It is inferred by `onnx.shape_inference` at the
  model's own input shapes; a tensor missing from the dict is unknown. Results are
  cached for the graph object they were computed on and dropped after a pass changed
  the graph, unless the pass lists the analysis in its `preserves` class attribute. A
  pass that rewrites the graph during its run and asks again calls `ctx.invalidate()`
  first.
- **Testing.** `onnxopt.testing.check_pass_contract(pass, model)` holds a pass to the
  contract every built-in pass keeps; `onnxopt.testing.tiny_models()` gives small
  models to run it on.
"""

from __future__ import annotations

from onnx_graphsurgeon import Constant, Graph, Node, Tensor, Variable

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.framework.context import PassContext
from onnxopt.ir.graph import (
    cleanup,
    constant_shape,
    constant_value,
    detach,
    graph_hash,
    graph_output_owner,
    is_constant,
    iter_graphs,
    new_constant,
    output_owners,
    producer,
    replace_all_uses,
    subgraphs_of,
    toposort,
    unique_name,
)

__all__ = [
    "Constant",
    "Graph",
    "Node",
    "PassContext",
    "Tensor",
    "TensorInfo",
    "Variable",
    "cleanup",
    "constant_shape",
    "constant_value",
    "detach",
    "graph_hash",
    "graph_output_owner",
    "is_constant",
    "iter_graphs",
    "new_constant",
    "output_owners",
    "producer",
    "replace_all_uses",
    "subgraphs_of",
    "toposort",
    "unique_name",
]
