"""The `fp16` pass: float16 mixed precision with float32 inputs, outputs and measured fallbacks."""

from onnxopt.passes.fp16.converter import Float16

__all__ = ["Float16"]
