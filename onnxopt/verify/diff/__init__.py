"""`onnxopt diff`: where two models part, tensor by tensor, and which layer and pass is at fault.

`matching` pairs the tensors, `runs` runs a chunk of them in bounded memory,
`layers` builds the per-layer models that measure a layer's own error,
`compare` drives a diff, `bisection` names the pass from `optimize --dump-dir`,
and `results` holds the report.
"""

from onnxopt.verify.diff.compare import DiffOptions, diff_models
from onnxopt.verify.diff.results import DiffReport, TensorDiff

__all__ = ["DiffOptions", "DiffReport", "TensorDiff", "diff_models"]
