"""onnxopt: a compiler-style graph optimizer for ONNX models.

    import onnxopt
    result = onnxopt.optimize("model.onnx", pipeline="fold,fuse")
    result.save("model.opt.onnx")
    print(result.report["passes"])

Pass authors: `onnxopt.rewrite` (graph helpers) and `onnxopt.testing` (the pass contract).
"""

from __future__ import annotations

import onnxopt.framework.builtin_analyses  # noqa: F401  (registers the core analyses)
from onnxopt.api import Result, optimize
from onnxopt.errors import CheckFailed, UserError
from onnxopt.framework.context import PassContext, register_analysis
from onnxopt.framework.manager import PassManager
from onnxopt.framework.options import option
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.pipeline import build_pipeline
from onnxopt.framework.registry import register_pass

__version__ = "0.1.0"
__all__ = [
    "optimize",
    "Result",
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "build_pipeline",
    "register_pass",
    "register_analysis",
    "option",
    "UserError",
    "CheckFailed",
    "__version__",
]
