"""Tiny models in ONNX text for pass tests: one builder per graph shape a pass meets in practice.

Each builder returns a fresh `onnx.ModelProto` (weights from a seeded generator, so
every call gives the same bytes); `tiny_models()` gives all of them by name. Plugin
tests use them as they are or write their own with `model_from_text`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

_HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def model_from_text(text: str, initializers: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse a model in ONNX text (`onnx.parser`; a missing `<ir_version...>` header gets opset 17)
    and add `initializers` (name -> array) as weights; checked with `onnx.checker` (full)."""
    body = text.strip()
    model = onnx.parser.parse_model(body if body.startswith("<") else _HEADER + body)
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(seed: int, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def conv_bn_relu() -> onnx.ModelProto:
    """Conv with bias, BatchNormalization, Relu: what fusion folds into one Conv."""
    w = _weights(0, W=(8, 3, 3, 3), B=(8,), scale=(8,), shift=(8,), mean=(8,))
    w["var"] = np.abs(_weights(1, var=(8,))["var"]) + 0.5
    return model_from_text(
        """
        conv_bn_relu (float[1, 3, 16, 16] x) => (float[1, 8, 14, 14] y) {
            c = Conv (x, W, B)
            n = BatchNormalization (c, scale, shift, mean, var)
            y = Relu (n)
        }
        """,
        w,
    )


def matmul_add() -> onnx.ModelProto:
    """A 2-D MatMul by a weight plus a bias, then Relu: a Gemm in disguise."""
    return model_from_text(
        """
        matmul_add (float[4, 16] x) => (float[4, 8] y) {
            m = MatMul (x, W)
            a = Add (m, b)
            y = Relu (a)
        }
        """,
        _weights(2, W=(16, 8), b=(8,)),
    )


def constant_chain() -> onnx.ModelProto:
    """Arithmetic on weights alone before it meets the input: what constant folding removes."""
    return model_from_text(
        """
        constant_chain (float[2, 8] x) => (float[2, 8] y) {
            s = Add (a, b)
            t = Mul (s, a)
            y = Add (x, t)
        }
        """,
        _weights(3, a=(8,), b=(8,)),
    )


def transposes() -> onnx.ModelProto:
    """An NCHW->NHWC Transpose right after its inverse, around a Relu: layout round trips."""
    return model_from_text(
        """
        transposes (float[1, 3, 4, 5] x) => (float[1, 3, 4, 5] y) {
            t = Transpose <perm = [0, 2, 3, 1]> (x)
            u = Transpose <perm = [0, 3, 1, 2]> (t)
            y = Relu (u)
        }
        """
    )


def if_branches() -> onnx.ModelProto:
    """An If whose branches read the outer input: passes must work inside bodies or say they skip them."""
    return model_from_text(
        """
        if_branches (bool c, float[1, 4, 8] x) => (float[1, 4, 8] y) {
            y = If (c) <
                then_branch = then_g () => (float[1, 4, 8] a) {
                    t = Transpose <perm = [0, 2, 1]> (x)
                    u = Transpose <perm = [0, 2, 1]> (t)
                    a = Relu (u)
                },
                else_branch = else_g () => (float[1, 4, 8] b) {
                    s = Add (x, k)
                    b = Neg (s)
                }
            >
        }
        """,
        _weights(4, k=(8,)),
    )


def loop_body() -> onnx.ModelProto:
    """A Loop of three iterations whose body reads an outer input and a weight."""
    return model_from_text(
        """
        loop_body (float[1, 8] x) => (float[1, 8] y) {
            n = Constant <value = int64 {3}> ()
            c = Constant <value = bool {1}> ()
            y = Loop (n, c, x) <
                body = body_g (int64 i, bool cond, float[1, 8] acc) => (bool cond_out, float[1, 8] acc_out) {
                    cond_out = Identity (cond)
                    m = MatMul (acc, W)
                    r = Relu (m)
                    acc_out = Add (r, x)
                }
            >
        }
        """,
        _weights(5, W=(8, 8)),
    )


def nothing_to_do() -> onnx.ModelProto:
    """One activation-times-activation MatMul and a Relu: no weight, nothing most passes can change."""
    return model_from_text(
        """
        nothing_to_do (float[1, 8, 16] q, float[1, 16, 8] k) => (float[1, 8, 8] y) {
            s = MatMul (q, k)
            y = Relu (s)
        }
        """
    )


#: Every builder by name, in the order `tiny_models()` returns them.
BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu": conv_bn_relu,
    "matmul_add": matmul_add,
    "constant_chain": constant_chain,
    "transposes": transposes,
    "if_branches": if_branches,
    "loop_body": loop_body,
    "nothing_to_do": nothing_to_do,
}


def tiny_models() -> dict[str, onnx.ModelProto]:
    """A fresh copy of every tiny model, by name (see `BUILDERS`)."""
    return {name: build() for name, build in BUILDERS.items()}
