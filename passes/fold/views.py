"""View chains merged exactly (as onnxslim does): a Reshape of a view reads the view's input, two
Unsqueezes become one, a Transpose that only moves size-1 axes next to a Reshape becomes a Reshape.

Shape facts come from inference over the main graph (`info`: tensor name -> `TensorInfo`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import TensorInfo
from onnxopt.ir.graph import constant_value, unique_name

_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def shape_of(t: gs.Tensor, info: dict[str, TensorInfo]) -> tuple | None:
    """The shape of `t`: a constant's own, else the inferred one (None: unknown)."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    ti = info.get(t.name)
    return ti.shape if ti is not None else None


def const_ints(node: gs.Node, index: int, attr: str) -> list[int] | None:
    """An int list given as input `index` (a constant) or, in older opsets, as attribute `attr`."""
    if len(node.inputs) > index and node.inputs[index].name:
        v = constant_value(node.inputs[index])
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    if attr in node.attrs:
        return [int(x) for x in node.attrs[attr]]
    return None


def _moves_unit_axes_only(node: gs.Node, info: dict[str, TensorInfo]) -> bool:
    """A Transpose whose non-1 axes keep their order: the same memory layout as a Reshape."""
    shape = shape_of(node.inputs[0], info)
    perm = node.attrs.get("perm")
    if shape is None or perm is None or any(d == 0 for d in shape) or list(perm) == list(range(len(shape))):
        return False
    real = [p for p in perm if not (isinstance(shape[p], int) and shape[p] == 1)]
    return real == sorted(real) and sum(not isinstance(shape[p], int) for p in perm) <= 1


def transpose_to_reshape(graph: gs.Graph, node: gs.Node, info: dict[str, TensorInfo]) -> bool:
    """Replace a Transpose that moves only size-1 axes by a Reshape, when a Reshape is next to it."""
    x = node.inputs[0]
    near = [p.op for p in x.inputs] + [c.op for c in node.outputs[0].outputs]
    if "Reshape" not in near or not _moves_unit_axes_only(node, info):
        return False
    shape = shape_of(x, info)
    assert shape is not None  # _moves_unit_axes_only needs a known shape
    target = np.array([shape[p] if isinstance(shape[p], int) else -1 for p in node.attrs["perm"]], dtype=np.int64)
    node.op, node.attrs = "Reshape", {}
    node.inputs.append(gs.Constant(unique_name(graph, f"{node.name or 'transpose'}_as_reshape"), target))
    return True


def _sole_producer(t: gs.Tensor, ops: set[str], members: set[int]) -> gs.Node | None:
    """The node of the main graph (ids in `members`), of the standard domain and one of `ops`, producing `t`."""
    p = t.inputs[0] if len(t.inputs) == 1 else None
    if p is None or p.op not in ops or p.domain or id(p) not in members:
        return None
    return p


def merge_reshape_of_view(graph: gs.Graph, node: gs.Node, info: dict[str, TensorInfo], members: set[int]) -> bool:
    """Reshape(view(x)) -> Reshape(x): a Reshape depends only on its input's element count, unless a 0
    in its target copies a dim of that input (then a static output shape is used as the target)."""
    view = _sole_producer(node.inputs[0], _VIEW_OPS, members)
    if view is None or not view.inputs or len(node.inputs) < 2:
        return False
    target = constant_value(node.inputs[1])
    if target is None:
        return False
    target = np.asarray(target).reshape(-1)
    if (target == 0).any() and not node.attrs.get("allowzero", 0):
        out = shape_of(node.outputs[0], info)
        if out is None or not all(isinstance(d, int) and d > 0 for d in out):
            return False
        node.inputs[1] = gs.Constant(
            unique_name(graph, f"{node.name or 'reshape'}_shape"), np.array(out, dtype=np.int64)
        )
    node.inputs[0] = view.inputs[0]
    return True


def _absolute_axes(
    first: gs.Node, a1: list[int], a2: list[int], info: dict[str, TensorInfo]
) -> tuple[list[int], list[int], int | None] | None:
    """The axes of two chained Unsqueezes with negative ones made absolute, and the final rank where that
    needed it (None when nothing was negative); None when a negative axis meets an input of unknown rank."""
    if not any(a < 0 for a in a1 + a2):
        return a1, a2, None
    shape = shape_of(first.inputs[0], info)
    if shape is None:
        return None
    out_rank = len(shape) + len(a1) + len(a2)
    a1 = [a + out_rank - len(a2) if a < 0 else a for a in a1]
    a2 = [a + out_rank if a < 0 else a for a in a2]
    return a1, a2, out_rank


def _merged_axes(a1: list[int], a2: list[int]) -> list[int]:
    """The final positions of the axes inserted by Unsqueeze(a1) then Unsqueeze(a2)."""
    second = set(a2)
    kept = [p for p in range(len(a1) + len(a2) + max(a1 + a2) + 1) if p not in second]
    return sorted(second | {kept[a] for a in a1})


def merge_unsqueezes(
    graph: gs.Graph, node: gs.Node, info: dict[str, TensorInfo], opset: int, members: set[int]
) -> bool:
    """Unsqueeze(Unsqueeze(x, a1), a2) -> Unsqueeze(x, a): the final positions of all inserted axes."""
    first = _sole_producer(node.inputs[0], {"Unsqueeze"}, members)
    if first is None:
        return False
    a1, a2 = const_ints(first, 1, "axes"), const_ints(node, 1, "axes")
    if a1 is None or a2 is None:
        return False
    absolute = _absolute_axes(first, a1, a2, info)
    if absolute is None:
        return False
    a1, a2, out_rank = absolute
    axes = _merged_axes(a1, a2)
    if out_rank is not None and axes and axes[-1] >= out_rank:
        return False
    node.inputs[0] = first.inputs[0]
    if opset >= 13:
        node.inputs[1] = gs.Constant(
            unique_name(graph, f"{node.name or 'unsqueeze'}_axes"), np.array(axes, dtype=np.int64)
        )
    else:
        node.attrs["axes"] = axes
    return True
