"""Channel dependency analysis: the coupling rules on small graphs, barriers by name, real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from fixtures.fetch_models import model_path
from onnxopt.ir.graph import import_model
from onnxopt.passes.prune.channels import analyze_channels


def _graph(text: str, weights: dict[str, np.ndarray]):
    model = onnx.parser.parse_model(text)
    for name, value in weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    return import_model(model)


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'


def _group_of(cg, r):
    return cg.groups[cg.class_group[cg.find(int(r.out_ids[0]))]]


def test_chain_conv_bn_relu_conv_is_one_prunable_group():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        n = BatchNormalization (a, s, bb, m, v)
        r = Relu (n)
        y = Conv (r, w2)
    }""",
        {"w1": _w(6, 3, 3, 3), "b1": _w(6), "s": _w(6), "bb": _w(6), "m": _w(6), "v": np.ones(6), "w2": _w(4, 6, 1, 1)},
    )
    cg = analyze_channels(g)
    grp = _group_of(cg, cg.reducers[0])
    assert grp.prunable and len(grp.classes) == 6
    kinds = {(s.node.op, s.index, s.axis) for s in cg.sites if s.kind == "const"}
    assert {
        ("Conv", 1, 0),
        ("Conv", 2, 0),
        ("BatchNormalization", 1, 0),
        ("BatchNormalization", 4, 0),
        ("Conv", 1, 1),
    } <= kinds
    out_group = _group_of(cg, cg.reducers[1])
    assert not out_group.prunable and any("graph output" in b for b in out_group.barriers)


def test_residual_add_joins_sources_and_se_mul_joins_gate():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 4, 8, 8] x) => (float[1, 2, 8, 8] y) {
        a = Conv (x, w1)
        b = Conv (x, w2)
        s = Add (a, b)
        p = GlobalAveragePool (s)
        e = Conv (p, w3)
        h = HardSigmoid (e)
        m = Mul (s, h)
        y = Conv (m, w4)
    }""",
        {"w1": _w(5, 4, 1, 1), "w2": _w(5, 4, 1, 1, seed=1), "w3": _w(5, 5, 1, 1), "w4": _w(2, 5, 1, 1)},
    )
    cg = analyze_channels(g)
    groups = [grp for grp in cg.groups if len(grp.sources) > 1]
    assert len(groups) == 1 and len(groups[0].sources) == 3 and len(groups[0].classes) == 5
    assert groups[0].prunable


def test_concat_offsets_and_split():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 8, 8] x) => (float[1, 2, 8, 8] y, float[1, 2, 8, 8] z) {
        a = Conv (x, wa)
        b = Conv (x, wb)
        c = Concat <axis = 1> (a, b)
        y = Conv (c, wc)
        sp = Constant <value = int64[2] {3, 7}> ()
        s1, s2 = Split <axis = 1> (c, sp)
        z = Conv (s2, wz)
    }""",
        {"wa": _w(4, 3, 1, 1), "wb": _w(6, 3, 1, 1), "wc": _w(2, 10, 1, 1), "wz": _w(2, 7, 1, 1)},
    )
    cg = analyze_channels(g)
    ra, rb, rc, rz = (cg.reducers[k] for k in range(4))
    assert np.array_equal(rc.in_ids, np.concatenate([ra.out_ids, rb.out_ids]))
    assert np.array_equal(rz.in_ids, np.concatenate([ra.out_ids, rb.out_ids])[3:])
    assert any(s.kind == "split" for s in cg.sites)


def test_flatten_gemm_repeats_channels_by_trailing_size():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 4, 4] x) => (float[1, 5] y) {
        a = Conv (x, w1)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (a)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, w2, b2)
    }""",
        {"w1": _w(3, 3, 1, 1), "w2": _w(5, 12), "b2": _w(5)},
    )
    cg = analyze_channels(g)
    conv, gemm = cg.reducers
    assert np.array_equal(gemm.in_ids, np.repeat(conv.out_ids, 4))
    assert any(s.node.op == "Gemm" and s.index == 1 and s.axis == 1 for s in cg.sites)


def test_depthwise_conv_couples_input_and_output_channels():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 8, 8] x) => (float[1, 2, 8, 8] y) {
        a = Conv (x, w1)
        d = Conv <group = 4, pads = [1, 1, 1, 1]> (a, wd)
        y = Conv (d, w2)
    }""",
        {"w1": _w(4, 3, 1, 1), "wd": _w(8, 1, 3, 3), "w2": _w(2, 8, 1, 1)},
    )
    cg = analyze_channels(g)
    first, dw, last = cg.reducers
    assert dw.depthwise and np.array_equal(dw.out_ids, np.repeat(first.out_ids, 2))
    assert any(s.kind == "group" for s in cg.sites)
    assert _group_of(cg, first).prunable


def test_transpose_unsqueeze_and_matmul_follow_the_axis():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 8] x) => (float[1, 8, 2] y) {
        a = Conv (x, w1)
        t = Transpose <perm = [0, 2, 1]> (a)
        y = MatMul (t, w2)
    }""",
        {"w1": _w(6, 3, 1), "w2": _w(6, 2)},
    )
    cg = analyze_channels(g)
    conv, mm = cg.reducers
    assert np.array_equal(mm.in_ids, conv.out_ids)
    assert _group_of(cg, conv).prunable


@pytest.mark.parametrize(
    "op_text, reason",
    [
        ("s = LRN <size = 3> (a)", "LRN"),
        ("s = Softmax <axis = 1> (a)", "channel axis"),
        ("s = ArgMax <axis = 1, keepdims = 1> (a)", "ArgMax"),
    ],
)
def test_barriers_are_named(op_text, reason):
    g = _graph(
        HEADER
        + f"""
    agraph (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {{
        a = Conv (x, w1)
        {op_text}
        y = Cast <to = 1> (s)
    }}""",
        {"w1": _w(4, 3, 1, 1)},
    )
    cg = analyze_channels(g)
    grp = cg.groups[0]
    assert not grp.prunable and any(reason in b for b in grp.barriers)


def test_dynamic_weights_are_a_barrier():
    g = _graph(
        HEADER
        + """
    agraph (float[1, 3, 8, 8] x, float[2, 4, 1, 1] w2) => (float[1, 2, 8, 8] y) {
        a = Conv (x, w1)
        y = Conv (a, w2)
    }""",
        {"w1": _w(4, 3, 1, 1)},
    )
    cg = analyze_channels(g)
    assert any("dynamic weights" in b for b in cg.groups[0].barriers)


def _real(name):
    path = model_path(name)
    if not path.exists():
        pytest.skip(f"{path} missing: run python fixtures/fetch_models.py")
    return import_model(onnx.load(str(path)))


@pytest.mark.parametrize("name, min_prunable", [("cls", 20), ("det", 30), ("rec", 15)])
def test_real_models_have_prunable_groups_and_named_barriers(name, min_prunable):
    cg = analyze_channels(_real(name))
    assert sum(g.prunable for g in cg.groups) >= min_prunable
    assert all(b for g in cg.groups for b in g.barriers)
    assert any(g.barriers for g in cg.groups)
