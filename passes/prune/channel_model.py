"""What the channel dependency analysis produces: channel ids joined into classes and groups, and the
places (`Site`) and layers (`Reducer`) a removal must touch.

Kept apart from the rules that build it (`channels`, `channel_rules`, `layout_rules`) so that the
prune pass reads only this vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_value


@dataclass
class Site:
    """One place that must be cut when channels are removed.

    kind: "const" (input `index` of `node`, sliced on `axis`), "split" (split
    sizes of a Split), "slice" (starts/ends of a Slice on the channel axis),
    "group" (the `group` attribute of a depthwise conv), "reshape" (entry `axis`
    of a Reshape's shape, = kept positions), "reshape_piece" (entry `axis` of
    the constant input `index` of `node` that feeds a Reshape's computed shape). `ids` are the channel ids along the
    cut axis, one per position.
    """

    kind: str
    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    extra: Any = None


@dataclass
class Reducer:
    """A node that creates channels (out) and/or sums over them (in), with its MACs."""

    node: gs.Node
    out_ids: np.ndarray
    in_ids: np.ndarray | None
    input_tensor: str | None
    depthwise: bool = False

    @property
    def consumed(self) -> str:
        """`input_tensor`, for a reducer that sums over tracked channels (`in_ids` is set)."""
        assert self.input_tensor is not None, f"{self.node.name} sums over no tracked channel"
        return self.input_tensor


@dataclass
class Group:
    """Coupled channels: the sources joined by elementwise ops and every class of channels they carry."""

    name: str
    sources: list[str]
    classes: list[int]
    barriers: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        """Nothing stops its channels from being removed, and it has more than one to choose from."""
        return not self.barriers and len(self.classes) > 1


class ChannelGroups:
    """Result of the analysis: union-find over channel ids, groups, sites, reducers, tracked tensors."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.source_of: list[int] = []
        self.src_parent: list[int] = []
        self.source_names: list[str] = []
        self.sites: list[Site] = []
        self.reducers: list[Reducer] = []
        #: tensor name -> (axis, ids) for every tensor that carries tracked channels.
        self.tensors: dict[str, tuple[int, np.ndarray]] = {}
        self.barrier_marks: list[tuple[int, str]] = []
        self.groups: list[Group] = []
        self.class_group: dict[int, int] = {}

    def find(self, i: int) -> int:
        """The class (union-find root) of channel id `i`, compressing the path on the way."""
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def roots(self, ids: np.ndarray) -> np.ndarray:
        """The class (union-find root) of each id."""
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    def keep_mask(self, ids: np.ndarray, removed: set[int]) -> np.ndarray:
        """True for positions whose class is not in `removed`."""
        return np.fromiter((self.find(int(i)) not in removed for i in ids), dtype=bool, count=len(ids))

    def summary(self) -> dict[str, Any]:
        """Group counts for a report."""
        return {
            "groups": len(self.groups),
            "prunable_groups": sum(g.prunable for g in self.groups),
            "barrier_groups": sum(bool(g.barriers) for g in self.groups),
        }


class Unsupported(Exception):
    """A node the rules cannot follow; its tracked inputs become a barrier."""


#: Ops evaluated on constants so that e.g. a Reshape of a constant bias counts as a constant.
_CONST_OPS: dict[str, Callable[..., Any]] = {
    "Identity": lambda x, *a, **k: x,
    "Cast": lambda x, *a, **k: x,
    "Reshape": lambda x, s, **k: x.reshape([d if d != 0 else x.shape[i] for i, d in enumerate(s.tolist())]),
    "Unsqueeze": lambda x, axes=None, **k: np.expand_dims(x, tuple(k.get("attr_axes") or axes.tolist())),
    "Squeeze": lambda x, axes=None, **k: np.squeeze(x, tuple(k.get("attr_axes") or axes.tolist())),
}
#: What evaluating one of `_CONST_OPS` on values it does not accept raises (bad shapes or axes,
#: a missing axes input): the chain is then not a constant.
_CONST_OP_ERRORS = (ValueError, TypeError, IndexError, AttributeError)


def const_value(t: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """Value of a constant, or of a short Reshape/Unsqueeze/Squeeze/Cast chain over constants."""
    v = constant_value(t)
    if v is not None or depth == 0 or not t.inputs:
        return v
    p = t.inputs[0]
    fn = _CONST_OPS.get(p.op)
    if fn is None or not p.inputs:
        return None
    args = [const_value(i, depth - 1) for i in p.inputs if i.name]
    if any(a is None for a in args):
        return None
    try:
        out = np.asarray(fn(*args, attr_axes=p.attrs.get("axes")))
    except _CONST_OP_ERRORS:
        return None
    if p.op == "Cast":
        out = out.astype(onnx.helper.tensor_dtype_to_np_dtype(int(p.attrs["to"])))
    return out
