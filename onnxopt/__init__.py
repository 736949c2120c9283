"""onnxopt: a compiler-style graph optimizer for ONNX models.

    import onnxopt
    result = onnxopt.optimize("model.onnx", pipeline="fold,fuse")
    result.save("model.opt.onnx")
    print(result.report["passes"])
"""
from __future__ import annotations

import onnxopt.analyses  # noqa: F401  (registers the core analyses)
from onnxopt.api import Result, optimize
from onnxopt.errors import CheckFailed, UserError
from onnxopt.manager import PassManager
from onnxopt.pass_base import Pass, PassContext, PassResult, option, register_analysis
from onnxopt.registry import register_pass

__version__ = "0.1.0"
__all__ = ["optimize", "Result", "Pass", "PassContext", "PassResult", "PassManager", "register_pass",
           "register_analysis", "option", "UserError", "CheckFailed", "__version__"]
