"""The `cancel-transpose` pass: Transpose(Transpose(x, p1), p2) is x when the permutations undo
each other, so consumers of the second Transpose read x and both nodes go.

Exporters leave such pairs at layout boundaries (NCHW <-> NHWC around an op that was
converted, or inlined functions that each restore their layout). The rewrite is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from onnxopt import Pass, PassContext, PassResult, option, register_pass
from onnxopt.rewrite import Graph, Node, detach, iter_graphs, producer, replace_all_uses


def _perm(node: Node, rank: int | None) -> list[int] | None:
    """The permutation of a Transpose: its `perm`, else the reversal of `rank` axes (None if unknown)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return list(reversed(range(rank))) if rank is not None else None


def composes_to_identity(first: Sequence[int] | None, second: Sequence[int] | None) -> bool:
    """True if transposing by `first`, then by `second`, gives back the input's layout.

    Output axis i of the second Transpose is axis `second[i]` of the first's output, which is
    axis `first[second[i]]` of the input: the pair cancels when that is i for every axis.
    `None` stands for ONNX's default (reverse the axes), whose rank comes from the other perm;
    two defaults always cancel.
    """
    if first is None and second is None:
        return True
    rank = len(first if first is not None else second)
    p1 = list(first) if first is not None else list(reversed(range(rank)))
    p2 = list(second) if second is not None else list(reversed(range(rank)))
    return len(p1) == len(p2) and all(p1[p2[i]] == i for i in range(len(p2)))


def _inverse_pair(node: Node) -> Node | None:
    """The Transpose feeding `node` if `node` is a Transpose that undoes it, else None."""
    if node.op != "Transpose" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    first = producer(node.inputs[0])
    if first is None or first.op != "Transpose" or not first.inputs:
        return None
    given = node.attrs.get("perm", first.attrs.get("perm"))
    rank = len(given) if given is not None else None
    p1, p2 = _perm(first, rank), _perm(node, rank)
    if p1 is None and p2 is None:
        return first  # both reverse the axes: an involution whatever the rank
    return first if composes_to_identity(p1, p2) else None


@register_pass("cancel-transpose")
class CancelTranspose(Pass):
    """Remove a Transpose followed by its inverse Transpose (main graph and control-flow bodies)."""

    tolerance = "exact"
    #: Every tensor left keeps its name, type and shape (a graph output keeps its name through an
    #: Identity), so the shapes analysis stays valid.
    preserves = ("shapes",)

    @dataclass
    class Options:
        max_rounds: int = option(8, "stop after this many sweeps (a sweep may expose a new pair)", low=1)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cancelled = in_bodies = 0
        for _ in range(self.options.max_rounds):
            found = 0
            for g in list(iter_graphs(graph)):
                for node in list(g.nodes):
                    first = _inverse_pair(node) if node.outputs else None
                    if first is None:
                        continue
                    replace_all_uses(graph, node.outputs[0], first.inputs[0])
                    detach(node)  # the manager's cleanup drops it, and `first` once nothing reads it
                    found += 1
                    in_bodies += g is not graph
            cancelled += found
            if not found:
                break
        return PassResult(
            changed=cancelled > 0,
            stats={"cancelled_pairs": cancelled, "in_subgraphs": in_bodies},
            reason="" if cancelled else "no Transpose is directly followed by its inverse Transpose",
        )
