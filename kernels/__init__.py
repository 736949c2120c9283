"""Pure numpy numerics used by the passes: calibration statistics, quantization
ranges and arithmetic, low-rank factorization, and output comparison metrics.

Nothing here knows about graphs or ONNX, so every function can be tested with
plain arrays.
"""
