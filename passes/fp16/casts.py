"""Remove Casts that undo each other: a float pass never leaves a round trip it could drop.

`x --Cast(float16)--> --Cast(float)-->` with x float32 reads x (the round trip only
rounded it), and `x --Cast(float)--> --Cast(float16)-->` with x float16 reads x
exactly; a Cast to the type its input already has is dropped too. Readers of the
last Cast are moved to `x`; Casts left without readers go with the manager's
cleanup.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from onnxopt.ir.graph import detach, iter_graphs, producer, replace_all_uses

from .eligibility import FLOAT, FLOAT16

_PAIR = {FLOAT, FLOAT16}


def remove_cast_round_trips(graph: gs.Graph, elem_type: Callable[[gs.Tensor], int | None]) -> int:
    """Drop every float32/float16 Cast round trip and no-op Cast in `graph` and its bodies; returns how many."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for g in list(iter_graphs(graph)):
            for node in list(g.nodes):
                source = _undone_to(node, elem_type)
                if source is not None:
                    replace_all_uses(graph, node.outputs[0], source)
                    detach(node)
                    removed += 1
                    changed = True
    return removed


def _undone_to(node: gs.Node, elem_type: Callable[[gs.Tensor], int | None]) -> gs.Tensor | None:
    """The tensor a Cast's output equals after dropping a round trip or a no-op, or None."""
    if node.op != "Cast" or len(node.inputs) != 1 or not node.outputs:
        return None
    to = node.attrs.get("to")
    src = node.inputs[0]
    if elem_type(src) == to:
        return src
    first = producer(src)
    if first is None or first.op != "Cast" or len(first.inputs) != 1:
        return None
    origin = first.inputs[0]
    if {elem_type(origin), first.attrs.get("to")} == _PAIR and elem_type(origin) == to:
        return origin
    return None
