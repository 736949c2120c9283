"""Element types of constants, as folding needs them.

Folding evaluates through numpy, which holds some ONNX element types only
approximately (bfloat16, float8, int4...: gs reports them as other numbers or
converts them lossily). These helpers say which types are exact (a constant's size
is `onnxopt.ir.constants.constant_nbytes`).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def exact_in_numpy(dtype: object) -> bool:
    """True when numpy holds values of this (gs) dtype exactly: bool, integers, IEEE floats, complex,
    strings. bfloat16, float8, int4... are ONNX element types gs reports as numbers or converts lossily."""
    try:
        dt = np.dtype(cast(Any, dtype))  # any object: a TypeError says it is no dtype
    except TypeError:
        return False
    return dt.kind in "biufcOSU" and dt.isbuiltin == 1  # ml_dtypes' bfloat16/float8/int4 are not built in


def onnx_type_exact(elem_type: int | None) -> bool:
    """`exact_in_numpy` for an ONNX element type (e.g. a Cast's `to`)."""
    try:
        return elem_type is not None and exact_in_numpy(onnx.helper.tensor_dtype_to_np_dtype(int(elem_type)))
    except (KeyError, ValueError, TypeError):
        return False


def is_float(t: gs.Tensor) -> bool:
    """True when `t` is known to hold floating-point values (from its declared type)."""
    try:
        return t.dtype is not None and np.dtype(t.dtype).kind == "f"
    except TypeError:
        return False
