"""Block-wise weight-only quantization (the `weightonly` pass): `weightonly` (the pass), `layers`
(what it can quantize), `plan` (int4 / int8 / float per layer), `timing` (MatMulNBits vs float on
the CPU EP), `rewrite` (MatMulNBits, GatherBlockQuantized or blocked DequantizeLinear), `options`.
The numbers are in `onnxopt.kernels.blockquant` and `onnxopt.kernels.gptq`."""

from onnxopt.passes.weightonly.weightonly import WeightOnly

__all__ = ["WeightOnly"]
