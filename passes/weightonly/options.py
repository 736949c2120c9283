"""The options of the weightonly pass, in their own module so that the pass's modules can name their type."""

from __future__ import annotations

from dataclasses import dataclass

from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass


@dataclass
class WeightOnlyOptions(Pass.Options):
    """Block-wise weight-only quantization: what to write and how to round it."""

    bits: int = option(
        4, "bits of the quantized weights (layers that lose time or accuracy may take 8)", choices=(4, 8)
    )
    block: int = option(32, "rows of K sharing one scale and zero point", choices=(32, 64, 128))
    rounding: str = option(
        "gptq",
        "rtn (round to nearest, range clipped by search) | gptq (error feedback through the input second "
        "moment, needs --calib) | awq (per-input-channel scale search, needs --calib)",
        choices=("rtn", "gptq", "awq"),
    )
    size: float | None = option(
        None,
        "budget: quantized layers' bytes as a fraction of their float bytes; layers of largest error go to "
        "int8 while it holds (none: every layer at `bits` where not slower)",
        above=0,
        high=1,
    )
    accuracy_level: str = option(
        "auto",
        "MatMulNBits accuracy_level: auto (the fastest measured per layer shape), 0 (unset), 1 (fp32), "
        "2 (fp16), 4 (int8 activations)",
        choices=("auto", "0", "1", "2", "4"),
    )
    gather: bool = option(True, "also block-quantize constant Gather tables (embeddings) along their rows")
    timing: bool = option(True, "time each layer shape as MatMulNBits vs float on the CPU EP; never keep a slower one")
    min_elements: int = option(4096, "leave weights with fewer values alone", low=0)
    damp: float = option(0.01, "GPTQ damping of the input second moment, relative to its mean diagonal", above=0)
