"""Random small ONNX graphs for property-based tests (hypothesis), and the check they must pass.

A graph is a list of op names applied to a running tensor that starts as
x[N, C, H, W] with a dynamic batch N: Conv, BatchNormalization, per-channel
Add/Mul, Relu, Concat with a branch, Transpose pairs, and a reshape through
shape arithmetic (Shape/Gather/Concat/Reshape, so N stays dynamic); a
"flatten" turns it into [N, F] through the same arithmetic, after which the
ops map to Gemm, MatMul(+Add), 2-D BatchNormalization and per-feature
Add/Mul. Some weights are built by constant expressions for `fold` to fold.
The spec (ops, channels, seed, flags) is what hypothesis shrinks; the graph is
rebuilt from it deterministically, so a shrunk spec is a regression test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPS = ("conv", "bn", "add", "mul", "relu", "concat", "transpose", "reshape", "flatten", "gemm", "matmul")


@dataclass(frozen=True)
class Spec:
    """What a random graph is made of; `build` turns it into a model."""

    ops: tuple[str, ...]
    channels: int = 3
    size: int = 4
    seed: int = 0
    const_expr: bool = False  # build some weights as Mul(Constant, Constant) for fold
    zero_channels: int = 0  # zero this many output channels of every Conv/Gemm (dead for exact prune)
    low_rank: int = 0  # if > 0, Gemm/MatMul weights have exactly this rank


def specs(max_ops: int = 6, zero_channels: bool = False, low_rank: bool = False) -> st.SearchStrategy[Spec]:
    """Hypothesis strategy of graph specs."""
    return st.builds(
        Spec,
        ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=max_ops).map(tuple),
        channels=st.integers(1, 6),
        size=st.integers(1, 5),
        seed=st.integers(0, 2**16),
        const_expr=st.booleans(),
        zero_channels=st.integers(1, 2) if zero_channels else st.just(0),
        low_rank=st.integers(1, 3) if low_rank else st.just(0),
    )


@dataclass
class _Builder:
    spec: Spec
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    k: int = 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        """A constant input: an initializer, or (const_expr) Mul of two Constant nodes that fold computes."""
        value = np.asarray(value)
        name = self.name(base)
        if self.spec.const_expr and value.dtype == np.float32 and value.size > 1:
            a, b = self.name(base + "_half"), self.name(base + "_two")
            self.nodes.append(helper.make_node("Constant", [], [a], value=numpy_helper.from_array(value / 2)))
            self.nodes.append(
                helper.make_node("Constant", [], [b], value=numpy_helper.from_array(np.array(2, np.float32)))
            )
            self.nodes.append(helper.make_node("Mul", [a, b], [name]))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def weight(self, *shape: int, fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    def matrix(self, m: int, n: int) -> np.ndarray:
        """An m x n weight, of exact rank `low_rank` when asked; `zero_channels` output columns zeroed."""
        if self.spec.low_rank:
            r = min(self.spec.low_rank, m, n)
            w = self.weight(m, r, fan_in=m) @ self.weight(r, n, fan_in=r)
        else:
            w = self.weight(m, n, fan_in=m)
        w[:, : min(self.spec.zero_channels, n - 1)] = 0
        return w.astype(np.float32)

    def batch(self, x: str) -> str:
        """The dynamic batch dimension of `x` as a 1-element int64 tensor (shape arithmetic)."""
        s = self.node("Shape", [x])
        return self.node("Gather", [s, self.const(np.array([0], np.int64), "idx")], axis=0)


def build(spec: Spec) -> onnx.ModelProto:
    """The model a spec describes (opset 15, input x[N, C, H, W], one output)."""
    b = _Builder(spec, np.random.default_rng(spec.seed))
    c, h, w = spec.channels, spec.size, spec.size
    x = "x"
    feat: int | None = None  # set once flattened to [N, feat]
    for op in spec.ops:
        if feat is None and op in ("flatten", "gemm", "matmul"):
            n = b.batch(x)
            x = b.node("Reshape", [x, b.node("Concat", [n, b.const(np.array([-1], np.int64), "m1")], axis=0)])
            feat = c * h * w
            if op == "flatten":
                continue
        if feat is None:
            x, c, h, w = _op_4d(b, op, x, c, h, w)
        else:
            x, feat = _op_2d(b, op, x, feat)
    y_shape = ["N", c, h, w] if feat is None else ["N", feat]
    graph = helper.make_graph(
        b.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.channels, spec.size, spec.size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, y_shape)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(b: _Builder, x: str, c: int, co: int) -> str:
    k = int(b.rng.choice([1, 3]))
    wt = b.weight(co, c, k, k, fan_in=c * k * k)
    z = min(b.spec.zero_channels, co - 1)
    wt[:z] = 0
    inputs = [x, b.const(wt, "W")]
    if b.rng.random() < 0.7:
        bias = b.weight(co, fan_in=1)
        bias[:z] = 0
        inputs.append(b.const(bias, "B"))
    return b.node("Conv", inputs, pads=[k // 2] * 4, kernel_shape=[k, k])


def _bn(b: _Builder, x: str, c: int) -> str:
    scale, bias, mean = (b.weight(c, fan_in=1) for _ in range(3))
    var = b.rng.uniform(0.5, 2.0, c).astype(np.float32)
    return b.node(
        "BatchNormalization",
        [x, b.const(scale, "s"), b.const(bias, "b"), b.const(mean, "m"), b.const(var, "v")],
        epsilon=1e-5,
    )


def _op_4d(b: _Builder, op: str, x: str, c: int, h: int, w: int) -> tuple[str, int, int, int]:
    if op == "conv":
        co = int(b.rng.integers(1, 7))
        return _conv(b, x, c, co), co, h, w
    if op == "bn":
        return _bn(b, x, c), c, h, w
    if op in ("add", "mul"):
        shape = [(1, c, 1, 1), (c, 1, 1), (1,), (c, h, w)][int(b.rng.integers(0, 4))]
        v = b.rng.uniform(0.5, 1.5, shape).astype(np.float32)
        operands = [x, b.const(v, op)] if b.rng.random() < 0.5 else [b.const(v, op), x]
        return b.node(op.capitalize(), operands), c, h, w
    if op == "relu":
        return b.node("Relu", [x]), c, h, w
    if op == "concat":
        co = int(b.rng.integers(1, 4))
        return b.node("Concat", [x, _conv(b, x, c, co)], axis=1), c + co, h, w
    if op == "transpose":
        t = b.node("Transpose", [x], perm=[0, 2, 3, 1])
        t = b.node("Mul", [t, b.const(b.rng.uniform(0.5, 1.5, (c,)).astype(np.float32), "nhwc")])
        return b.node("Transpose", [t], perm=[0, 3, 1, 2]), c, h, w
    if op == "reshape":
        n = b.batch(x)
        flat = b.node("Reshape", [x, b.node("Concat", [n, b.const(np.array([c, h * w], np.int64), "chw")], axis=0)])
        tail = b.node("Shape", [x], start=1)
        return b.node("Reshape", [flat, b.node("Concat", [n, tail], axis=0)]), c, h, w
    raise AssertionError(op)


def _op_2d(b: _Builder, op: str, x: str, f: int) -> tuple[str, int]:
    if op in ("conv", "gemm"):
        fo = int(b.rng.integers(2, 9))
        trans_b = int(b.rng.integers(0, 2))
        wt = b.matrix(f, fo)
        inputs = [x, b.const(wt.T.copy() if trans_b else wt, "G")]
        if b.rng.random() < 0.7:
            inputs.append(b.const(b.weight(fo, fan_in=1), "gb"))
        alpha = float(b.rng.choice([1.0, 0.5]))
        return b.node("Gemm", inputs, transB=trans_b, alpha=alpha, beta=float(b.rng.choice([1.0, 2.0]))), fo
    if op == "matmul":
        fo = int(b.rng.integers(2, 9))
        y = b.node("MatMul", [x, b.const(b.matrix(f, fo), "M")])
        if b.rng.random() < 0.6:
            y = b.node("Add", [y, b.const(b.weight(fo, fan_in=1), "mb")])
        return y, fo
    if op == "bn":
        return _bn(b, x, f), f
    if op in ("add", "mul"):
        shape = [(f,), (1, f), (1,)][int(b.rng.integers(0, 3))]
        return b.node(op.capitalize(), [x, b.const(b.rng.uniform(0.5, 1.5, shape).astype(np.float32), op)]), f
    if op == "relu":
        return b.node("Relu", [x]), f
    if op == "concat":
        fo = int(b.rng.integers(1, 4))
        branch = b.node("Gemm", [x, b.const(b.matrix(f, fo), "cg")])
        return b.node("Concat", [x, branch], axis=1), f + fo
    if op in ("transpose", "reshape", "flatten"):
        n = b.batch(x)
        return b.node("Reshape", [x, b.node("Concat", [n, b.const(np.array([f], np.int64), "f")], axis=0)]), f
    raise AssertionError(op)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's output on the CPU EP with graph optimizations off (what the graph says)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]


def assert_same_outputs(
    spec: Spec, pipeline: str, batches: tuple[int, ...] = (2, 3, 1), rtol: float = 1e-4, atol: float = 1e-5
) -> onnx.ModelProto:
    """Optimize the spec's model (batch axis left dynamic) and compare outputs at every batch; return the result.

    Checking at batch sizes other than the one the pipeline saw proves dynamic axes were not frozen.
    """
    import onnxopt

    model = build(spec)
    shape = (spec.channels, spec.size, spec.size)
    out = onnxopt.optimize(model, pipeline=pipeline).model  # input_shapes would pin the batch axis
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["x"] and out.graph.output[0].name == model.graph.output[0].name
    rng = np.random.default_rng(spec.seed + 1)
    for n in batches:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        ref, got = run(model, x), run(out, x)
        assert got.shape == ref.shape, f"batch {n}: shape {got.shape} != {ref.shape}"
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=f"{pipeline} at batch {n}")
    return out
