"""What onnxopt remembers about a gs.Graph, kept beside it rather than patched onto it.

A side table keyed by the graph object (weakly: an entry goes with its graph) holds:

- `SourceModel`: what onnx-graphsurgeon drops on import (model-level fields, metadata, IR version,
  functions, declared I/O types, node doc strings, overridable initializers) and `export_model`
  writes back;
- the set of names taken in the graph, collected on the first `unique_name` call of a pass;
- the output owners a rewrite sweep computed once (`pin_output_owners`).

gs graphs define `__eq__` without `__hash__`, so the table is keyed by `id()` with a weak reference
that removes the entry when the graph is collected (before its id can be reused).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Literal, overload

import onnx
import onnx_graphsurgeon as gs


@dataclass
class SourceModel:
    """What gs drops from the model a graph was imported from, restored by `export_model`."""

    #: producer_name, producer_version, domain, model_version, doc_string.
    model_fields: dict[str, object] = field(default_factory=dict)
    metadata: list[tuple[str, str]] = field(default_factory=list)
    ir_version: int | None = None
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    #: Declared types gs cannot export (optional, map), by input/output name, subgraphs included.
    io_types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    #: The main graph's declared inputs and outputs, by name.
    declared_io: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    #: Node doc strings by node name (a pass renaming a node moves its entry).
    node_docs: dict[str, str] = field(default_factory=dict)
    #: Initializers also listed as graph inputs (IR >= 4): defaults a caller may override, by name.
    overridable: dict[str, onnx.TensorProto] = field(default_factory=dict)
    #: True when the model's weights are staged on disk (`onnxopt.ir.weights`).
    mapped: bool = False


@dataclass
class _State:
    source: SourceModel | None = None
    names: set[str] | None = None
    owners: dict[int, gs.Graph] | None = None


_STATES: dict[int, tuple[weakref.ref, _State]] = {}


@overload
def _state(graph: gs.Graph, create: Literal[True]) -> _State: ...
@overload
def _state(graph: gs.Graph, create: bool = False) -> _State | None: ...
def _state(graph: gs.Graph, create: bool = False) -> _State | None:
    """`graph`'s entry in the side table; made when `create` is true, else None if it has none."""
    key = id(graph)
    hit = _STATES.get(key)
    if hit is not None and hit[0]() is graph:
        return hit[1]
    if not create:
        return None
    state = _State()

    def forget(_ref: weakref.ref, k: int = key) -> None:
        _STATES.pop(k, None)

    _STATES[key] = (weakref.ref(graph, forget), state)
    return state


def remember_source(graph: gs.Graph, source: SourceModel) -> None:
    """Record what `graph`'s source model carried beyond what gs imports."""
    _state(graph, create=True).source = source


def imported_from(graph: gs.Graph) -> SourceModel | None:
    """What `graph`'s source model carried (see `SourceModel`); None for a graph `import_model` did not build."""
    state = _state(graph)
    return state.source if state is not None else None


def source_or_empty(graph: gs.Graph) -> SourceModel:
    """`imported_from(graph)`, or an empty `SourceModel` (nothing to restore)."""
    return imported_from(graph) or SourceModel()


def overridable_defaults(graph: gs.Graph) -> dict[str, onnx.TensorProto]:
    """Default values of the graph inputs a caller may override, by name (empty if none)."""
    return source_or_empty(graph).overridable


def node_docs(graph: gs.Graph) -> dict[str, str] | None:
    """Doc strings of `graph`'s nodes by name, to update when a node is renamed; None if not imported."""
    source = imported_from(graph)
    return source.node_docs if source is not None else None


def is_mapped(graph: gs.Graph) -> bool:
    """True for a graph imported from a model whose weights are staged on disk (`onnxopt.ir.weights`)."""
    return source_or_empty(graph).mapped


def taken_names(graph: gs.Graph) -> set[str] | None:
    """The names `unique_name` collected in `graph` during this pass, None before its first call."""
    state = _state(graph)
    return state.names if state is not None else None


def remember_names(graph: gs.Graph, names: set[str]) -> None:
    """Record the names taken in `graph` (kept up to date by `unique_name`)."""
    _state(graph, create=True).names = names


def forget_names(graph: gs.Graph) -> None:
    """Drop the collected names: the next `unique_name` collects them again (the manager does so per pass)."""
    state = _state(graph)
    if state is not None:
        state.names = None


def pin_output_owners(graph: gs.Graph, owners: dict[int, gs.Graph] | None) -> None:
    """Keep `owners` (from `output_owners`) for a sweep in which output tensors keep their identity;
    None unpins them."""
    state = _state(graph, create=owners is not None)
    if state is not None:
        state.owners = owners


def pinned_output_owners(graph: gs.Graph) -> dict[int, gs.Graph] | None:
    """The owners pinned by `pin_output_owners`, None if none are."""
    state = _state(graph)
    return state.owners if state is not None else None
