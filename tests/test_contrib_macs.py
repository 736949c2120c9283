"""MACs of models holding onnxruntime's quantized contrib ops (QAttention, MatMulNBits): onnxruntime's
symbolic shape inference, the second opinion for pinned inputs, stops at QAttention, so it runs on the
stand-in copy; regression for a quantized encoder that reported 0 MACs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.analysis.stats import model_stats

H, HEADS = 32, 4


def _encoder() -> onnx.ModelProto:
    """A position table sliced to the sequence length computed from Shape(x) (as BERT exports do),
    added to x, then QAttention and a MatMulNBits."""
    rng = np.random.default_rng(0)
    inits = {
        "pos": rng.standard_normal((1, 64, H)).astype(np.float32),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "w": rng.integers(-127, 127, (H, 3 * H)).astype(np.int8),
        "b": np.zeros(3 * H, np.float32),
        "xs": np.array(0.1, np.float32),
        "ws": np.array(0.01, np.float32),
        "wb": rng.integers(0, 255, (H, 1, 16)).astype(np.uint8),
        "sc": np.ones((H, 1), np.float32),
    }
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["len"], axis=0),
        helper.make_node("Slice", ["pos", "zero", "len", "one"], ["p"]),
        helper.make_node("Add", ["x", "p"], ["h"]),
        helper.make_node("QAttention", ["h", "w", "b", "xs", "ws"], ["a"], domain="com.microsoft", num_heads=HEADS),
        helper.make_node(
            "MatMulNBits", ["a", "wb", "sc"], ["y"], domain="com.microsoft", K=H, N=H, bits=4, block_size=32
        ),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", H])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "enc", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8
    )


def test_quantized_contrib_ops_are_counted_at_pinned_shapes() -> None:
    stats = model_stats(_encoder(), input_shapes={"x": (1, 16, H)})
    assert stats.macs_uncounted == 0
    qkv, scores = 16 * H * 3 * H, 16 * 16 * 2 * H  # projection; Q @ K^T and probabilities @ V
    assert stats.macs == qkv + scores + 16 * H * H
