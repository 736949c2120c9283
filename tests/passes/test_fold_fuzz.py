"""Property: what `fold` computes from integer constants equals what onnxruntime computes.

Small graphs apply one op (elementwise arithmetic or a shape-like op) to integer
values of one dtype, either held in initializers (folded through the runtime) or
derived from a static `Shape` (folded as shape arithmetic in Python). The
folded model must run to the same values and dtype as the original, and the op
must have been folded away. Op/dtype pairs onnxruntime has no kernel for are
left out (there is nothing to compare against).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from conftest import run_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxopt

DTYPES = {
    np.int8: TensorProto.INT8,
    np.uint8: TensorProto.UINT8,
    np.int16: TensorProto.INT16,
    np.int32: TensorProto.INT32,
    np.int64: TensorProto.INT64,
    np.uint32: TensorProto.UINT32,
    np.uint64: TensorProto.UINT64,
}
BINARY = ("Add", "Sub", "Mul", "Div", "Mod", "Mod1", "Max", "Min")
UNARY = ("Neg", "Abs")
SHAPE_OPS = ("Concat", "Gather", "Slice", "Unsqueeze", "Squeeze", "Reshape")
OPSET = 17


def _node(op: str, inputs: list[str], output: str) -> onnx.NodeProto:
    if op == "Mod1":
        return helper.make_node("Mod", inputs, [output], fmod=1)
    if op == "Mod":
        return helper.make_node("Mod", inputs, [output], fmod=0)
    if op == "Concat":
        return helper.make_node("Concat", inputs, [output], axis=0)
    if op == "Gather":
        return helper.make_node("Gather", inputs, [output], axis=0)
    return helper.make_node(op, inputs, [output])


@functools.cache
def runtime_supports(op: str, dtype: type) -> bool:
    """Whether onnxruntime's CPU EP runs `op` on `dtype` (checked once by running it)."""
    elem = DTYPES[dtype]
    a = helper.make_tensor_value_info("a", elem, [1])
    b = helper.make_tensor_value_info("b", elem, [1])
    inputs = [a] if op in UNARY else [a, b]
    g = helper.make_graph(
        [_node(op, [i.name for i in inputs], "y")], "probe", inputs, [helper.make_tensor_value_info("y", elem, None)]
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    try:
        feeds = {i.name: np.array([1], dtype) for i in inputs}
        run_model(model, feeds)
    except Exception:  # noqa: BLE001  onnxruntime's errors share no base class: any failure means unsupported
        return False
    return True


CASES = [(op, dt) for op in BINARY + UNARY for dt in DTYPES if runtime_supports(op, dt)]


def _values(dtype: type, n: int):
    info = np.iinfo(dtype)
    edge = st.sampled_from([info.min, info.max, 0, 1, -1 if info.min < 0 else 2, info.max // 2 + 1])
    return st.lists(st.one_of(edge, st.integers(int(info.min), int(info.max))), min_size=n, max_size=n)


def _safe_divisors(op: str, a: list[int], b: list[int], dtype: type) -> list[int]:
    """Divisors that do not trap in the runtime (a zero, or the minimum over -1, kill the process)."""
    if op not in ("Div", "Mod", "Mod1"):
        return b
    lo = int(np.iinfo(dtype).min)
    return [(2 if y == 0 else 1 if (y == -1 and x == lo and op == "Div") else y) for x, y in zip(a, b)]


def _model(nodes, inputs, consumer_input: str, elem: int, inits) -> onnx.ModelProto:
    """A graph whose folded value `consumer_input` is concatenated with a runtime input (so it is
    not itself a graph output, which fold keeps as computed)."""
    z = helper.make_tensor_value_info("z", elem, [1])
    nodes = nodes + [helper.make_node("Concat", [consumer_input, "z"], ["y"], axis=0)]
    g = helper.make_graph(nodes, "fuzz", inputs + [z], [helper.make_tensor_value_info("y", elem, ["m"])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(model, full_check=True)
    (want,) = run_model(model, feeds)
    out = onnxopt.optimize(model, pipeline="fold").model
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Concat"], "all but the runtime Concat should have folded"
    (got,) = run_model(out, feeds)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("source", ["initializer", "shape"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_integer_elementwise_folds_like_onnxruntime(source, data):
    op, dtype = data.draw(st.sampled_from(CASES), label="op/dtype")
    elem = DTYPES[dtype]
    n = data.draw(st.integers(1, 3), label="n")
    unary = op in UNARY
    feeds = {"z": np.zeros(1, dtype)}
    if source == "initializer":
        a = data.draw(_values(dtype, n), label="a")
        b = _safe_divisors(op, a, data.draw(_values(dtype, n), label="b"), dtype)
        inits = [numpy_helper.from_array(np.array(a, dtype), "a")]
        if not unary:
            inits.append(numpy_helper.from_array(np.array(b, dtype), "b"))
        model = _model([_node(op, ["a"] if unary else ["a", "b"], "t")], [], "t", elem, inits)
    else:
        # a comes from a static shape: Shape(x) cast to the dtype (so it wraps like a real model's cast)
        dims = data.draw(st.lists(st.integers(0, 300), min_size=n, max_size=n), label="dims")
        a = [int(np.array(d).astype(dtype)) for d in dims]
        b = _safe_divisors(op, a, data.draw(_values(dtype, n), label="b"), dtype)
        nodes = [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Cast", ["s"], ["a"], to=elem),
            _node(op, ["a"] if unary else ["a", "b"], "t"),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        model = _model(nodes, [x], "t", elem, [] if unary else [numpy_helper.from_array(np.array(b, dtype), "b")])
        feeds["x"] = np.zeros(dims, np.float32)
    _check(model, feeds)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_integer_shape_ops_fold_like_onnxruntime(data):
    op = data.draw(st.sampled_from(SHAPE_OPS), label="op")
    dtype = data.draw(st.sampled_from(list(DTYPES)), label="dtype")
    elem = DTYPES[dtype]
    dims = data.draw(st.lists(st.integers(1, 300), min_size=1, max_size=4), label="dims")
    from_shape = data.draw(st.booleans(), label="from_shape")
    n = len(dims)
    feeds = {"z": np.zeros(1, dtype), "x": np.zeros(dims, np.float32)}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    if from_shape:
        head = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["a"], to=elem)]
        inits = []
    else:
        head = []
        inits = [numpy_helper.from_array(np.array(data.draw(_values(dtype, n), label="a"), dtype), "a")]
    i64 = functools.partial(np.array, dtype=np.int64)
    if op == "Concat":
        other = np.array(data.draw(_values(dtype, 2), label="other"), dtype)
        inits.append(numpy_helper.from_array(other, "o"))
        tail = [_node("Concat", ["a", "o"], "t")]
    elif op == "Gather":
        idx = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=3), label="idx")
        inits.append(numpy_helper.from_array(i64(idx), "i"))
        tail = [_node("Gather", ["a", "i"], "t")]
    elif op == "Slice":
        start = data.draw(st.integers(-n - 1, n + 1), label="start")
        end = data.draw(st.integers(-n - 1, n + 1), label="end")
        step = data.draw(st.sampled_from([1, 2, -1, -2]), label="step")
        inits += [
            numpy_helper.from_array(i64([v]), k) for k, v in (("st", start), ("en", end), ("ax", 0), ("sp", step))
        ]
        tail = [
            helper.make_node("Slice", ["a", "st", "en", "ax", "sp"], ["s1"]),
            helper.make_node("Concat", ["s1", "a"], ["t"], axis=0),
        ]  # keeps an empty slice a valid Concat input
    elif op in ("Unsqueeze", "Squeeze"):
        k = data.draw(st.integers(-n, n - 1), label="k")
        inits += [numpy_helper.from_array(i64([k]), "k"), numpy_helper.from_array(i64([0]), "ax")]
        tail = [
            _node("Gather", ["a", "k"], "g"),
            helper.make_node("Squeeze", ["g", "ax"], ["q"]),
            helper.make_node("Unsqueeze", ["q", "ax"], ["t"]),
        ]
    else:  # Reshape of an integer constant vector to [n, 1] and back
        inits += [numpy_helper.from_array(i64([n, 1]), "s2"), numpy_helper.from_array(i64([-1]), "s1")]
        tail = [helper.make_node("Reshape", ["a", "s2"], ["r"]), helper.make_node("Reshape", ["r", "s1"], ["t"])]
    model = _model(head + tail, [x], "t", elem, inits)
    _check(model, feeds)


def test_every_dtype_has_a_case_the_runtime_runs():
    """The probe must leave most pairs in: an empty case list would make the property vacuous."""
    assert {dt for _, dt in CASES} >= {np.int32, np.int64}
    assert {op for op, _ in CASES} >= set(BINARY + UNARY)
