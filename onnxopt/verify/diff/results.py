"""What `diff` found: per matched tensor its error, its layer's own error, the first divergence.

`to_dict` is the JSON form (`onnxopt diff --json`, and the `diff` section the
HTML report plots); `format_text` the terminal form.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxopt.report.tables import table
from onnxopt.verify.comparison import OutputCheck


@dataclass
class TensorDiff:
    """One matched tensor: how far the candidate's value is from the reference's (worst over samples), and
    the error its layer makes by itself when fed the reference's inputs (`own_*`)."""

    ref: str
    cand: str
    node: str
    op: str
    depth: int
    how: str
    max_abs: float = 0.0
    mean_abs: float = 0.0
    cosine: float | None = None
    sqnr_db: float | None = None
    violations: list[str] = field(default_factory=list)
    own_max_abs: float | None = None
    own_cosine: float | None = None
    own_sqnr_db: float | None = None
    own_violations: list[str] = field(default_factory=list)
    #: Why the layer's own error was not measured ("" when it was).
    own_problem: str = ""

    def set_total(self, oc: OutputCheck) -> None:
        """Take the worst-case metrics and violations of the tensor as the candidate computes it."""
        self.max_abs, self.mean_abs, self.cosine, self.sqnr_db = oc.max_abs, oc.mean_abs, oc.cosine, oc.sqnr_db
        self.violations = list(oc.violations)

    def set_own(self, oc: OutputCheck) -> None:
        """Take the worst-case metrics of the layer fed the reference's inputs."""
        self.own_max_abs, self.own_cosine, self.own_sqnr_db = oc.max_abs, oc.cosine, oc.sqnr_db
        self.own_violations = list(oc.violations)

    @property
    def diverged(self) -> bool:
        return bool(self.violations)


@dataclass
class DiffReport:
    """The result of comparing two models tensor by tensor."""

    ref: str
    cand: str
    ep: str
    tolerance: str
    tolerance_source: str
    limits: str
    samples: str
    tensors: list[TensorDiff] = field(default_factory=list)
    #: Reference tensors written by a node that the candidate has no value for (fused away, folded).
    unmatched: int = 0
    chunks: int = 0
    chunk_size: int = 0
    warnings: list[str] = field(default_factory=list)
    #: The pass that introduced the divergence, from `--dump-dir` (`onnxopt.verify.diff.bisection`).
    bisect: dict[str, Any] | None = None

    @property
    def first_divergence(self) -> TensorDiff | None:
        """The first tensor, in the reference's topological order, whose error breaks the limits."""
        return next((t for t in self.tensors if t.diverged), None)

    def worst_layers(self, n: int) -> list[TensorDiff]:
        """The `n` layers with the largest own error (lowest own SQNR), worst first."""
        measured = [t for t in self.tensors if t.own_sqnr_db is not None]
        return sorted(measured, key=lambda t: (_finite(t.own_sqnr_db), t.depth))[:n]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        first = self.first_divergence
        return {
            "kind": "diff",
            "ref": self.ref,
            "cand": self.cand,
            "ep": self.ep,
            "tolerance": self.tolerance,
            "tolerance_source": self.tolerance_source,
            "limits": self.limits,
            "samples": self.samples,
            "matched": len(self.tensors),
            "unmatched": self.unmatched,
            "chunks": self.chunks,
            "chunk_size": self.chunk_size,
            "warnings": self.warnings,
            "first_divergence": asdict(first) if first else None,
            "tensors": [asdict(t) for t in self.tensors],
            "bisect": self.bisect,
        }

    def format_text(self, top: int = 10) -> str:
        """The terminal report: the verdict, the first divergence, the worst layers by own error."""
        lines = [
            f"diff {self.ref} -> {self.cand} on {self.ep}: {len(self.tensors)} tensors matched "
            f"({self.unmatched} not in the candidate), {self.samples}",
            f"limits ({self.tolerance}, from {self.tolerance_source}): {self.limits}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        first = self.first_divergence
        if first is None:
            lines.append("no tensor diverges beyond the limits")
        else:
            own = "its own error" if first.own_violations else "error it received from earlier layers"
            lines.append(
                f"first divergence: {first.ref} (node {first.node}, {first.op}, depth {first.depth}): "
                f"{'; '.join(first.violations)} - mostly {own}"
            )
        worst = self.worst_layers(top)
        if worst:
            lines += ["", f"layers by own error (top {len(worst)}):", _layers_table(worst)]
        if self.bisect:
            lines += ["", self.bisect["message"]]
        return "\n".join(lines)


def _finite(v: float | None) -> float:
    return math.inf if v is None else v


def _db(v: float | None) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")


def _layers_table(rows: list[TensorDiff]) -> str:
    return table(
        ["tensor", "node", "op", "depth", "own SQNR dB", "SQNR dB", "cosine", "max abs"],
        [
            [
                t.ref,
                t.node,
                t.op,
                t.depth,
                _db(t.own_sqnr_db),
                _db(t.sqnr_db),
                "-" if t.cosine is None else f"{t.cosine:.5f}",
                f"{t.max_abs:.3g}",
            ]
            for t in rows
        ],
    )
