"""Node placement of a model on one EP, as onnxruntime reports it: which nodes fell back to the CPU EP."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxopt.verify.ep import EP_PROVIDERS
from onnxopt.verify.ep.runner import WorkerResult

CPU = EP_PROVIDERS["cpu"]
IGNORED_FALLBACK_OPS = {"MemcpyToHost", "MemcpyFromHost"}
"""Nodes onnxruntime inserts itself to move data; on the CPU EP by design, not a fallback."""


@dataclass
class Placement:
    """Where onnxruntime put the nodes of CAND on one EP, read from the session."""

    method: str
    provider: str
    total: int
    on_target: int | None
    subgraphs: int
    fallback: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line: nodes on the target EP, its subgraphs, and the nodes that fell back to the CPU EP."""
        short = self.provider.removesuffix("ExecutionProvider")
        count = f"{self.on_target} of {self.total} nodes" if self.on_target is not None else "nodes"
        text = f"{short}: {count}"
        if self.provider != CPU:
            text += f" in {self.subgraphs} subgraph{'s' if self.subgraphs != 1 else ''}"
        if self.provider != CPU and self.fallback:
            names = ", ".join(f"{n['name'] or '(unnamed)'} ({n['op_type']})" for n in self.fallback[:10])
            more = f" and {len(self.fallback) - 10} more" if len(self.fallback) > 10 else ""
            text += f"; fell back to CPU: {names}{more}"
        return text + f" [{self.method}]"


def read_placement(res: WorkerResult, provider: str, model: onnx.ModelProto) -> Placement | None:
    """Summarise the worker's per-node placement: nodes on the target EP and those left to the CPU EP."""
    raw = res.placement
    if not raw:
        return None
    nodes = raw.get("nodes", [])
    fallback = [n for n in nodes if n["ep"] != provider and n["op_type"] not in IGNORED_FALLBACK_OPS]
    subgraphs = sum(1 for s in raw.get("subgraphs", []) if s["ep"] == provider)
    on_target: int | None
    if raw.get("method") == "assignment_info":
        total = len([n for n in nodes if n["op_type"] not in IGNORED_FALLBACK_OPS])
        on_target = total - len(fallback)
    else:  # a profile lists compiled subgraphs as one node each: count against the model's node count
        total = len(model.graph.node)
        on_target = None if provider != CPU else len(nodes)
        if provider != CPU and subgraphs:
            on_target = max(total - len(fallback), 0)
    return Placement(raw.get("method", "?"), provider, total, on_target, subgraphs, [] if provider == CPU else fallback)
