"""Tolerance classes: what a pipeline was allowed to change, and the limits its result is judged by.

One table for `optimize --check` (`onnxopt.verify.check`) and `onnxopt
validate`: both judge an output with the class's `pass_` limits through the
same rule (`onnxopt.verify.comparison.judge`), so they give the same verdict on
the same model and inputs. Each pass declares its class (`Pass.tolerance`); a
pipeline takes the loosest class of its passes (`loosest`), and `optimize`
records it in the model (`onnxopt.verify.provenance`, by the names below).

The limits per class (CAND vs REF, both on the CPU EP):

- `exact` (fold, fuse): max abs error within `1e-5 + 1e-4 * max|ref|`, a hard
  limit (float rounding of reordered arithmetic);
- `fp16` (fp16): cosine >= 0.999, SQNR >= 30 dB, top-1 agreement >= 0.95:
  float16 rounds each value to 11 significant bits (about 70 dB for one
  rounding); 30 dB leaves room for the roundings of a deep network while a
  node that overflowed (Inf/NaN) or lost its range fails;
- `approximate` (prune, lowrank): cosine >= 0.98 (the passes' own accuracy
  guard aims at the same 0.98), SQNR >= 15 dB, top-1 agreement >= 0.9 on
  class-score outputs;
- `quantize`: cosine >= 0.99, SQNR >= 20 dB, top-1 agreement >= 0.9.

Choice made when the two tables were merged: `--check` used to accept a
quantized model at SQNR >= 10 dB while `validate` asked for 20 dB. 20 dB is
kept: 10 dB is a noise power of a tenth of the signal (about 32 % RMS error),
which a broken quantization (a wrong scale on one layer) still meets, while
healthy int8 models measure 25-40 dB; 20 dB (about 10 % RMS error) also agrees
with the cosine limit of 0.99 (about 17 dB for uncorrelated noise). `--check`
likewise now applies the cosine, SQNR and top-k limits of every class, and the
exact class's bound relative to the output's largest magnitude, as `validate`
always did.

`backend` limits bound how far an execution provider may differ from the CPU
EP on the same model (`validate` only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from onnxopt.errors import UserError


@dataclass(frozen=True)
class Thresholds:
    """Limits on one comparison; None disables a limit.

    An output within `atol + rtol * max|ref|` of the reference is equal to float
    rounding and passes outright: cosine and SQNR of a near-zero output (a
    detector's map on an empty image) measure only noise. `require_close` makes
    that closeness itself a limit (exact passes).
    """

    atol: float = 1e-5
    rtol: float = 1e-4
    require_close: bool = False
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_topk: float | None = None
    topk: int = 1

    def looser(self, other: Thresholds) -> Thresholds:
        """The limits that both `self` and `other` would accept (each field the looser one).

        A limit that only one side sets is kept: the backend limits leave top-k
        unjudged, and the end-to-end check must not drop the passes' top-k limit.
        """
        return Thresholds(
            max(self.atol, other.atol),
            max(self.rtol, other.rtol),
            self.require_close and other.require_close,
            _lower(self.min_cosine, other.min_cosine),
            _lower(self.min_sqnr_db, other.min_sqnr_db),
            _lower(self.min_topk, other.min_topk),
            self.topk,
        )

    def describe(self) -> str:
        """The limits as one readable line (`max_abs<=1e-05+0.0001*max|ref| cosine>=0.99999 ...`)."""
        parts = [f"max_abs{'<=' if self.require_close else ' ok if <='}{self.atol:g}+{self.rtol:g}*max|ref|"]
        if self.min_cosine is not None:
            parts.append(f"cosine>={self.min_cosine:g}")
        if self.min_sqnr_db is not None:
            parts.append(f"sqnr>={self.min_sqnr_db:g}dB")
        if self.min_topk is not None:
            parts.append(f"top{self.topk}>={self.min_topk:g}")
        return " ".join(parts)


def _lower(a: float | None, b: float | None) -> float | None:
    """The looser of two lower limits, where None means "no limit on this side"."""
    return b if a is None else a if b is None else min(a, b)


class Tolerance(Enum):
    """The tolerance classes, tightest first; each holds its `pass_` and `backend` limits.

    `pass_`: what a pipeline of this class may change (CAND vs REF on the CPU
    EP). `backend`: how far a backend may differ from the CPU EP on the same
    model (float kernels vs integer kernels).
    """

    pass_: Thresholds
    backend: Thresholds

    EXACT = (
        "exact",
        Thresholds(require_close=True, min_cosine=0.99999, min_sqnr_db=60.0),
        Thresholds(min_cosine=0.9999, min_sqnr_db=40.0),
    )
    FP16 = (
        "fp16",
        Thresholds(min_cosine=0.999, min_sqnr_db=30.0, min_topk=0.95),
        Thresholds(min_cosine=0.999, min_sqnr_db=30.0),
    )
    APPROXIMATE = (
        "approximate",
        Thresholds(min_cosine=0.98, min_sqnr_db=15.0, min_topk=0.9),
        Thresholds(min_cosine=0.9999, min_sqnr_db=40.0),
    )
    QUANTIZE = (
        "quantize",
        Thresholds(min_cosine=0.99, min_sqnr_db=20.0, min_topk=0.9),
        Thresholds(min_cosine=0.995, min_sqnr_db=25.0),
    )

    def __new__(cls, name: str, pass_: Thresholds, backend: Thresholds) -> Tolerance:
        member = object.__new__(cls)
        member._value_ = name
        member.pass_ = pass_
        member.backend = backend
        return member

    @classmethod
    def named(cls, name: str) -> Tolerance:
        """The class called `name`, or a `UserError` listing the known ones."""
        try:
            return cls(name)  # type: ignore[call-arg]  # a lookup by value: mypy checks it against __new__
        except ValueError:
            raise UserError(f"unknown tolerance {name!r}; use one of: {', '.join(TOLERANCE_NAMES)}") from None


TOLERANCE_NAMES: tuple[str, ...] = tuple(t.value for t in Tolerance)
"""The class names, tightest first, as passes declare them and `optimize` records them."""


def loosest(classes: list[str]) -> str:
    """The loosest tolerance class among the passes of a pipeline (`exact` for none)."""
    return max(classes, key=TOLERANCE_NAMES.index) if classes else Tolerance.EXACT.value


@dataclass
class ThresholdSet:
    """The limits of one validation: `pass_` for the passes' error, `backend` for an EP's own error."""

    tolerance: str = Tolerance.EXACT.value
    pass_: Thresholds = field(default_factory=lambda: Tolerance.EXACT.pass_)
    backend: Thresholds = field(default_factory=lambda: Tolerance.EXACT.backend)

    @classmethod
    def for_tolerance(cls, tolerance: str, **overrides: float | int | None) -> ThresholdSet:
        """Defaults of a tolerance class, with pass-limit overrides (`min_cosine=0.999`, ...)."""
        tol = Tolerance.named(tolerance)
        # per-field types (`topk` int, the rest float); `dataclasses.replace` checks them at run time
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        if "atol" in given:  # an explicit max abs error is a hard limit
            given.update(rtol=0.0, require_close=True)
        return cls(
            tol.value,
            dataclasses.replace(tol.pass_, **given),
            dataclasses.replace(tol.backend, topk=given.get("topk", 1)),
        )
