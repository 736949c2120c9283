"""Node-count parity with onnxslim: the exact eliminations of `fold`, each on a small model with the
structure it was found in, and (slow) `fold,fuse` vs onnxslim on every zoo model, dynamic and pinned."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS, parse, run_model
from onnx import numpy_helper

import onnxopt

INT64_MAX = np.iinfo(np.int64).max


def _fold(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto:
    out = onnxopt.optimize(model, pipeline="fold", input_shapes=shapes).model
    onnx.checker.check_model(out, full_check=True)
    return out


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _same_outputs(ref: onnx.ModelProto, got: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for r, g in zip(run_model(ref, feeds), run_model(got, feeds)):
        assert r.dtype == g.dtype and r.shape == g.shape
        np.testing.assert_array_equal(g, r)


def _init(model: onnx.ModelProto, name: str) -> list:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name)).tolist()


def test_cast_to_the_inputs_own_type_goes():
    """A bool mask Unsqueezed then Cast to bool before a Where (an attention decoder's src_mask)."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (bool[B, S] m, float[B, 1, S] x) => (float[B, 1, S] y) {
        a = Constant <value = int64[1] {1}> ()
        u = Unsqueeze (m, a)
        c = Cast <to = 9> (u)
        neg = Constant <value = float {-1e9}> ()
        y = Where (c, neg, x)
    }""")
    out = _fold(model)
    assert "Cast" not in _ops(out)
    rng = np.random.default_rng(0)
    _same_outputs(model, out, {"m": rng.random((2, 5)) > 0.5, "x": rng.standard_normal((2, 1, 5)).astype(np.float32)})


def test_cast_that_converts_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (int64[N] x) => (float[N] y) {
        y = Cast <to = 1> (x)
    }""")
    assert _ops(_fold(model)) == ["Cast"]


def test_expand_to_a_shape_the_input_has_goes():
    """jax2tf's BroadcastTo after a Reshape: Expand to the shape the tensor already has (or 1s)."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    net (float[N, 2048] x) => (float[N, 2048, 1] y, float[N, 2048, 1] z) {
        t = Constant <value = int64[3] {-1, 2048, 1}> ()
        r = Reshape (x, t)
        s1 = Constant <value = int64[3] {1, 2048, 1}> ()
        e1 = Expand (r, s1)
        y = Relu (e1)
        s2 = Constant <value = int64[2] {1, 1}> ()
        e2 = Expand (r, s2)
        z = Neg (e2)
    }""")
    out = _fold(model)
    assert "Expand" not in _ops(out)
    _same_outputs(model, out, {"x": np.random.default_rng(1).standard_normal((3, 2048)).astype(np.float32)})


def test_expand_that_broadcasts_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 15]>
    net (float[N, 1, 16] x) => (float[N, 4, 16] y) {
        s = Constant <value = int64[3] {1, 4, 16}> ()
        y = Expand (x, s)
    }""")
    out = _fold(model)
    assert _ops(out) == ["Expand"]


def test_slice_keeping_everything_goes_once_sizes_are_known():
    """jax2tf's strided_slice: starts 0, ends 1e9 (or INT64_MAX) over every axis, permuted axes."""
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 15]>
    net (float[N, 1, 8, 4] x) => (float[N, 1, 8, 4] y, float[N, 1, 8, 4] z, float[N, 1, 8, 1] w) {{
        st = Constant <value = int64[4] {{0, 0, 0, 0}}> ()
        big = Constant <value = int64[4] {{1000000000, 1000000000, 1000000000, 1000000000}}> ()
        ax = Constant <value = int64[4] {{0, 2, 1, 3}}> ()
        s1 = Slice (x, st, big, ax)
        y = Relu (s1)
        end = Constant <value = int64[4] {{{INT64_MAX}, {INT64_MAX}, {INT64_MAX}, {INT64_MAX}}}> ()
        s2 = Slice (x, st, end)
        z = Neg (s2)
        one = Constant <value = int64[4] {{{INT64_MAX}, {INT64_MAX}, {INT64_MAX}, 1}}> ()
        s3 = Slice (x, st, one)
        w = Abs (s3)
    }}""")
    dynamic = _fold(model)
    assert _ops(dynamic).count("Slice") == 2  # 1e9 may not reach the end of the dynamic axis N; w keeps 1 of 4
    pinned = _fold(model, {"x": (2, 1, 8, 4)})
    assert _ops(pinned).count("Slice") == 1
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 4)).astype(np.float32)
    _same_outputs(model, dynamic, {"x": x})
    _same_outputs(model, pinned, {"x": x})


def test_concat_of_one_input_goes_and_keeps_the_output_name():
    """A sentence encoder's pooled output: Concat of a single Div, as a graph output."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[B, 384] x, float[B, 1] n) => (float[B, 384] pooled) {
        d = Div (x, n)
        pooled = Concat <axis = 1> (d)
    }""")
    out = _fold(model)
    assert _ops(out) == ["Div"] and out.graph.output[0].name == "pooled"
    rng = np.random.default_rng(3)
    _same_outputs(
        model,
        out,
        {"x": rng.standard_normal((2, 384)).astype(np.float32), "n": rng.uniform(1, 2, (2, 1)).astype(np.float32)},
    )


def test_identity_transpose_and_zero_pad_go():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 13]>
    net (float[N, 3, 5] x) => (float[N, 3, 5] y) {
        t = Transpose <perm = [0, 1, 2]> (x)
        p0 = Constant <value = int64[6] {0, 0, 0, 0, 0, 0}> ()
        p = Pad (t, p0)
        y = Relu (p)
    }""")
    out = _fold(model)
    assert _ops(out) == ["Relu"]


def test_transposes_moving_unit_axes_around_reshapes_become_one_reshape():
    """A bidirectional GRU's output [S, 2, B, H] -> Transpose(0,2,1,3) -> Reshape(0,0,-1) ->
    Transpose(1,0,2): with B pinned to 1 the Transposes only move size-1 axes, so the chain is one
    Reshape. Dynamic (B unknown) it stays."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[S, 2, B, 8] g) => (float[B, S, 16] memory) {
        t1 = Transpose <perm = [0, 2, 1, 3]> (g)
        s = Constant <value = int64[3] {0, 0, -1}> ()
        r = Reshape (t1, s)
        memory = Transpose <perm = [1, 0, 2]> (r)
    }""")
    assert _ops(_fold(model)).count("Transpose") == 2
    pinned = _fold(model, {"g": (16, 2, 1, 8)})
    assert _ops(pinned) == ["Reshape"] and pinned.graph.output[0].name == "memory"
    assert _init(pinned, pinned.graph.node[0].input[1]) == [1, 16, 16]
    _same_outputs(model, pinned, {"g": np.random.default_rng(4).standard_normal((16, 2, 1, 8)).astype(np.float32)})


def test_transpose_reordering_real_axes_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[4, 1, 3] x) => (float[12] y) {
        t = Transpose <perm = [2, 1, 0]> (x)
        s = Constant <value = int64[1] {12}> ()
        y = Reshape (t, s)
    }""")
    assert _ops(_fold(model)) == ["Transpose", "Reshape"]


def test_reshape_of_reshape_reads_the_first_input():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[2, 3, 4] x) => (float[4, 6] y) {
        a = Constant <value = int64[2] {6, 4}> ()
        r = Reshape (x, a)
        b = Constant <value = int64[2] {4, -1}> ()
        y = Reshape (r, b)
    }""")
    out = _fold(model)
    assert _ops(out) == ["Reshape"]
    _same_outputs(model, out, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})


def test_reshape_copying_a_dynamic_dim_of_a_view_stays():
    """Reshape(Unsqueeze(x), [0, 0, -1]): the 0s copy dims of the Unsqueeze's output, not of x."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[N, M] x) => (float[N, 1, M] y) {
        a = Constant <value = int64[1] {1}> ()
        u = Unsqueeze (x, a)
        s = Constant <value = int64[3] {0, 0, -1}> ()
        y = Reshape (u, s)
    }""")
    out = _fold(model)
    assert "Unsqueeze" in _ops(out)
    _same_outputs(model, out, {"x": np.ones((3, 5), np.float32)})


@pytest.mark.parametrize(
    "opset, first, second, expected",
    [
        (17, [1], [2], [1, 2]),  # an attention mask [B, S] -> [B, 1, 1, S]... in two steps
        (17, [-1], [-1], [2, 3]),  # negative axes, resolved with the known rank
        (17, [0, 2], [1], [0, 1, 3]),
        (11, [1], [2], [1, 2]),  # axes as an attribute before opset 13
    ],
)
def test_unsqueeze_of_unsqueeze_becomes_one(opset, first, second, expected):
    def axes(v):
        return f"<axes = [{', '.join(map(str, v))}]>" if opset < 13 else ""

    def arg(name, v):
        return "" if opset < 13 else f"{name} = Constant <value = int64[{len(v)}] {{{', '.join(map(str, v))}}}> ()"

    model = parse(f"""
    <ir_version: 7, opset_import: ["" : {opset}]>
    net (int64[2, 5] m) => (float y) {{
        {arg("a1", first)}
        u1 = Unsqueeze {axes(first)} (m{", a1" if opset >= 13 else ""})
        {arg("a2", second)}
        u2 = Unsqueeze {axes(second)} (u1{", a2" if opset >= 13 else ""})
        c = Cast <to = 1> (u2)
        y = ReduceSum <keepdims = 0> (c)
    }}""")
    out = _fold(model)
    assert _ops(out).count("Unsqueeze") == 1
    node = next(n for n in out.graph.node if n.op_type == "Unsqueeze")
    got = _init(out, node.input[1]) if opset >= 13 else list(node.attribute[0].ints)
    assert got == expected
    m = np.arange(10, dtype=np.int64).reshape(2, 5)
    ref = np.expand_dims(m, tuple(expected)).astype(np.float32)
    assert run_model(out, {"m": m})[0] == pytest.approx(ref.sum())
    _same_outputs(model, out, {"m": m})


# --- parity with onnxslim on real models -------------------------------------------------------

#: natural static shapes of the zoo's inputs (pinned mode)
PINS = {
    "det.onnx": {"x": (1, 3, 320, 320)},
    "rec.onnx": {"x": (1, 3, 48, 320)},
    "cls.onnx": {"x": (1, 3, 48, 192)},
    "magika.onnx": {"bytes": (1, 2048)},
    "layout_cdla.onnx": {"image": (1, 3, 800, 608)},
    "minilm.onnx": {"input_ids": (1, 128), "attention_mask": (1, 128)},
    "romanizer_encoder.onnx": {"src": (1, 16), "src_mask": (1, 16)},
    "romanizer_decoder.onnx": {"prefix": (1, 8), "memory": (1, 16, 256), "src_mask": (1, 16), "hidden": (1, 2, 256)},
    "tashkeel_bilstm_int8.onnx": {"input_ids": (1, 64)},
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "pinned"])
@pytest.mark.parametrize("file", list(PINS))
def test_fold_fuse_leaves_no_more_nodes_than_onnxslim(file, mode):
    onnxslim = pytest.importorskip("onnxslim")
    path = MODELS / file
    if not path.exists():
        pytest.skip(f"{path} missing: run `python fixtures/fetch_models.py`")
    pins = PINS[file] if mode == "pinned" else None
    ours = onnxopt.optimize(path, pipeline="fold,fuse", input_shapes=pins).model
    slim = onnxslim.slim(
        onnx.load(str(path)), input_shapes=[f"{k}:{','.join(map(str, v))}" for k, v in pins.items()] if pins else None
    )
    assert len(ours.graph.node) <= len(slim.graph.node), (
        f"{file} {mode}: fold,fuse {len(ours.graph.node)} nodes, onnxslim {len(slim.graph.node)}"
    )
