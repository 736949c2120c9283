"""Constant chains and MatMul+Add merged: Mul-Mul and Add-Add by constants become one op, and
MatMul(2-D x, constant W) + Add(constant bias) becomes one Gemm."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ir.graph import constant_shape, detach, new_constant, unique_name
from onnxopt.passes.fuse.scope import Scope, const_operand, sole_consumer


def merge_chain(sc: Scope, node: gs.Node) -> bool:
    """Mul(Mul(x, a), b) -> Mul(x, a*b) and Add(Add(x, a), b) -> Add(x, a+b) for constants."""
    found = const_operand(node)
    if found is None:
        return False
    x, v2 = found
    if not x.inputs or x.inputs[0].op != node.op or not sc.owns(x.inputs[0]) or sole_consumer(sc, x) is None:
        return False
    inner = x.inputs[0]
    found_inner = const_operand(inner)
    if found_inner is None:
        return False
    y, v1 = found_inner
    merged = (v1.astype(np.float64) * v2) if node.op == "Mul" else (v1.astype(np.float64) + v2)
    if merged.ndim > max(v1.ndim, v2.ndim) or merged.size > max(v1.size, v2.size):
        return False  # would materialize a larger broadcast constant
    dtype = np.result_type(v1.dtype, v2.dtype)
    node.inputs[0] = y
    node.inputs[1] = new_constant(sc.root, unique_name(sc.root, f"{node.name or node.op}_merged"), merged.astype(dtype))
    detach(inner)
    return True


def matmul_add_to_gemm(sc: Scope, mm: gs.Node) -> bool:
    """MatMul(x [M, K], W [K, N]) followed by Add(bias [N], [1, N] or one value of rank <= 2) becomes one Gemm.

    The Add's output must keep the MatMul's shape [M, N]: a bias of higher rank
    (even of size 1) would broadcast the result to more axes than Gemm writes.
    """
    w_shape = constant_shape(mm.inputs[1])
    if w_shape is None or len(w_shape) != 2 or sc.rank(mm.inputs[0]) != 2:
        return False
    add = sole_consumer(sc, mm.outputs[0])
    if add is None or add.op != "Add":
        return False
    found = const_operand(add)
    if found is None or found[0] is not mm.outputs[0]:
        return False
    bias = found[1]
    n = w_shape[1]
    if bias.ndim > 2 or not (bias.shape in ((n,), (1, n)) or bias.size == 1):
        return False
    bias_vec = np.broadcast_to(bias.reshape(-1), (n,)).astype(bias.dtype)
    x, w_t, out = mm.inputs[0], mm.inputs[1], add.outputs[0]
    c = gs.Constant(unique_name(sc.root, f"{add.name or 'bias'}_C"), bias_vec)
    for node in (add, mm):
        detach(node)
    sc.add(gs.Node("Gemm", name=unique_name(sc.root, f"{mm.name or 'MatMul'}_gemm"), inputs=[x, w_t, c], outputs=[out]))
    return True
