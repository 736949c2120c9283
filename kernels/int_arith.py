"""ONNX integer arithmetic on Python ints, exactly as onnxruntime computes it.

Shape arithmetic folded from inferred dimensions is done on Python ints (a
dimension may be symbolic, so numpy arrays do not fit). Python ints never
overflow and `//` floors, whereas ONNX integer tensors wrap around at their
width and `Div` truncates toward zero. These functions give the ONNX result for
a given element type, so a folded constant equals what the runtime would have
computed, bit for bit.
"""

from __future__ import annotations

import numpy as np

#: Integer element types these functions handle (numpy kinds "i" and "u").
INTEGER_KINDS = "iu"


def is_integer(dtype: np.dtype) -> bool:
    """True for numpy signed/unsigned integer dtypes (bool excluded)."""
    return np.dtype(dtype).kind in INTEGER_KINDS


def wrap(value: int, dtype: np.dtype) -> int:
    """`value` reduced to the range of integer `dtype` with two's-complement wrap-around."""
    info = np.iinfo(np.dtype(dtype))
    span = 1 << info.bits
    v = (int(value) - info.min) % span
    return v + info.min


def _trunc_div(a: int, b: int) -> int:
    """Integer division truncating toward zero (C semantics, ONNX `Div`)."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def _fmod(a: int, b: int) -> int:
    """Remainder with the sign of the dividend (C `fmod`, ONNX `Mod` with fmod=1)."""
    return a - b * _trunc_div(a, b)


def traps(a: int, b: int, dtype: np.dtype) -> bool:
    """True where integer division `a / b` is undefined in C and traps in the runtime (SIGFPE):
    division by zero, and the minimum of a signed type divided by -1."""
    return b == 0 or (np.dtype(dtype).kind == "i" and b == -1 and a == np.iinfo(np.dtype(dtype)).min)


def division_traps(a: np.ndarray, b: np.ndarray) -> bool:
    """`traps` for broadcast integer arrays: any zero divisor, or a signed minimum over -1."""
    a, b = np.asarray(a), np.asarray(b)
    if not (is_integer(a.dtype) and is_integer(b.dtype)):
        return False
    if np.any(b == 0):
        return True
    if a.dtype.kind != "i":
        return False
    try:
        return bool(np.any((a == np.iinfo(a.dtype).min) & (b == -1)))
    except ValueError:  # shapes do not broadcast: the runtime rejects the node, nothing traps
        return False


def binary(op: str, a: int, b: int, dtype: np.dtype, fmod: int = 0) -> int | None:
    """ONNX `op` (Add, Sub, Mul, Div, Mod, Max, Min) on two integers of `dtype`; None where the
    result is undefined (division by zero) or the op is not one of these."""
    if op == "Add":
        r = a + b
    elif op == "Sub":
        r = a - b
    elif op == "Mul":
        r = a * b
    elif op == "Div":
        if traps(a, b, dtype):
            return None
        r = _trunc_div(a, b)
    elif op == "Mod":
        if b == 0:
            return None
        r = _fmod(a, b) if fmod else a % b  # fmod=0: sign of the divisor, as Python's %
    elif op == "Max":
        r = max(a, b)
    elif op == "Min":
        r = min(a, b)
    else:
        return None
    return wrap(r, dtype)


def unary(op: str, a: int, dtype: np.dtype) -> int | None:
    """ONNX `op` (Neg, Abs, Identity) on an integer of `dtype` (Neg/Abs of the minimum wrap to itself)."""
    if op == "Neg":
        return wrap(-a, dtype)
    if op == "Abs":
        return wrap(abs(a), dtype)
    if op == "Identity":
        return wrap(a, dtype)
    return None


def cast(a: int, dtype: np.dtype) -> int:
    """ONNX `Cast` of an integer to integer `dtype` (keeps the low bits)."""
    return wrap(a, dtype)


def product(values) -> int:
    """Exact product of integers (element counts and byte sizes never overflow)."""
    out = 1
    for v in values:
        out *= int(v)
    return out
