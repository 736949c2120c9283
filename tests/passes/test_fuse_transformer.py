"""`fuse`'s transformer rewrites: decomposed LayerNorm -> LayerNormalization, GELU -> Gelu / BiasGelu /
FastGelu (cpu) or the standard Gelu (opset >= 20), Add + LayerNormalization -> SkipLayerNormalization
(cpu), each checked against onnxruntime and with variants where the rewrite must not fire."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import parse, run_model
from onnx import numpy_helper

from onnxopt.testing import apply_pass, check_pass_contract

RNG = np.random.default_rng(3)
H = 8


def _vec(values) -> str:
    arr = np.asarray(values).reshape(-1)
    return ", ".join(str(int(v)) if arr.dtype.kind == "i" else f"{float(v):.9g}" for v in arr)


def _model(body: str, inits: dict[str, np.ndarray], inputs: str, outputs: str = "float[B, S, 8] y", opset=17):
    """A model from ONNX text: `inits` become initializers (int64 for integer arrays, else float)."""
    consts = ", ".join(
        f"{'int64' if np.asarray(v).dtype.kind == 'i' else 'float'}{list(np.shape(v))} {k} = {{{_vec(v)}}}".replace(
            "[]", ""
        )
        for k, v in inits.items()
    )
    return _raw(
        parse(
            f'<ir_version: 8, opset_import: ["" : {opset}]>\ng ({inputs}) => ({outputs})\n'
            + (f"<{consts}>\n" if consts else "")
            + f"{{\n{body}\n}}"
        )
    )


def _raw(model):
    """Initializers as raw_data, as exporters write them: the text parser writes float_data, which the
    graph hash reads as changed once a pass has loaded the values."""
    for k, init in enumerate(model.graph.initializer):
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    return model


def _fuse(model, target="cpu"):
    out, res = apply_pass("fuse", model, settings={"target": target})
    return out, res


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _same(a, b, feeds, atol=1e-5):
    for x, y in zip(run_model(a, feeds), run_model(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=atol)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32) * 2 + 0.5


GAMMA, BETA = RNG.uniform(0.5, 1.5, H), RNG.standard_normal(H)
LN_BODY = """
  m = ReduceMean <axes = [-1]> (x)
  d = Sub(x, m)
  sq = Pow(d, two)
  v = ReduceMean <axes = [-1]> (sq)
  ve = Add(v, eps)
  sd = Sqrt(ve)
  n = Div(d, sd)
  g = Mul(n, gamma)
  y = Add(g, beta)
"""
LN_INITS = {"gamma": GAMMA, "beta": BETA, "eps": np.float32(1e-5), "two": np.float32(2.0)}


def _ln(body=LN_BODY, inits=None, opset=17, inputs="float[B, S, 8] x", outputs="float[B, S, 8] y"):
    return _model(body, LN_INITS if inits is None else inits, inputs, outputs, opset)


# ---- LayerNormalization


@pytest.mark.parametrize("target", ["cpu", "openvino"])
def test_decomposed_layernorm_becomes_one_op(target):
    m = _ln()
    out, res = _fuse(m, target)
    assert _ops(out) == ["LayerNormalization"] and res.stats["layernorm_fused"] == 1
    assert res.stats["target"] == target
    dims = [d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["B", "S"]  # shapes stay dynamic
    _same(m, out, {"x": _x(2, 5, H)})
    check_pass_contract("fuse", m, settings={"target": target})


def test_layernorm_reciprocal_mul_self_and_axes_input_at_opset_18():
    body = """
  m = ReduceMean (x, ax)
  d = Sub(x, m)
  sq = Mul(d, d)
  v = ReduceMean (sq, ax)
  ve = Add(eps, v)
  sd = Sqrt(ve)
  r = Reciprocal(sd)
  n = Mul(r, d)
  g = Mul(gamma, n)
  y = Add(beta, g)
"""
    m = _model(body, {**LN_INITS, "ax": np.array([2], np.int64)}, "float[B, S, 8] x", opset=18)
    out, res = _fuse(m)
    assert _ops(out) == ["LayerNormalization"]
    _same(m, out, {"x": _x(3, 4, H)})


def test_layernorm_without_affine_gets_unit_scale():
    body = "\n".join(LN_BODY.strip().splitlines()[:7]).replace("n = Div(d, sd)", "y = Div(d, sd)")
    m = _ln(body, {"eps": np.float32(1e-5), "two": np.float32(2.0)})
    out, _ = _fuse(m)
    assert _ops(out) == ["LayerNormalization"]
    _same(m, out, {"x": _x(2, 3, H)})


@pytest.mark.parametrize(
    "change",
    [
        ("m = ReduceMean <axes = [-1]> (x)", "m = ReduceMean <axes = [1]> (x)"),  # wrong axis
        ("v = ReduceMean <axes = [-1]> (sq)", "v = ReduceMean <axes = [-1], keepdims = 0> (sq)"),
        ("ve = Add(v, eps)", "ve = Add(v, e)"),  # epsilon not a constant
        ("sq = Pow(d, two)", "sq = Pow(d, three)"),  # not a square
        ("n = Div(d, sd)", "n = Div(x, sd)"),  # does not scale the centred values
    ],
)
def test_layernorm_not_fused_when_the_pattern_differs(change):
    inputs = "float[B, S, 8] x, float e" if "e)" in change[1] else "float[B, S, 8] x"
    m = _ln(LN_BODY.replace(*change), {**LN_INITS, "three": np.float32(3.0)}, inputs=inputs)
    out, res = _fuse(m)
    assert "LayerNormalization" not in _ops(out) and res.stats["layernorm_fused"] == 0


def test_layernorm_not_fused_when_an_intermediate_has_another_reader():
    m = _ln(outputs="float[B, S, 8] y, float[B, S, 1] v")
    out, _ = _fuse(m)
    assert "LayerNormalization" not in _ops(out)


def test_layernorm_with_dynamic_gamma_keeps_the_mul():
    m = _ln(inputs="float[B, S, 8] x, float[8] gamma", inits={k: v for k, v in LN_INITS.items() if k != "gamma"})
    out, _ = _fuse(m)
    assert _ops(out) == ["LayerNormalization", "Mul", "Add"]  # beta cannot move across the Mul
    _same(m, out, {"x": _x(2, 3, H), "gamma": GAMMA.astype(np.float32)})


def test_layernorm_left_before_opset_17_and_said_so():
    m = _ln(opset=16)
    out, res = _fuse(m)
    assert "LayerNormalization" not in _ops(out)
    assert res.stats["layernorm_left_decomposed"] == 1 and "opset >= 17" in res.skipped[0]["reason"]


# ---- GELU

ERF_FORMS = {
    "div_mul_x_then_half": """
  u = Div(x, sqrt2)
  e = Erf(u)
  a = Add(e, one)
  p = Mul(x, a)
  y = Mul(p, half)
""",
    "inv_sqrt2_half_first": """
  h = Mul(half, x)
  u = Mul(x, inv_sqrt2)
  e = Erf(u)
  a = Add(one, e)
  y = Mul(h, a)
""",
    "half_on_erf_then_x": """
  u = Div(x, sqrt2)
  e = Erf(u)
  a = Add(e, one)
  q = Mul(a, half)
  y = Mul(x, q)
""",
}
TANH_FORMS = {
    "pow3": """
  c = Pow(x, three)
  k = Mul(c, cubic)
  s = Add(x, k)
  t = Mul(s, s2pi)
  e = Tanh(t)
  a = Add(e, one)
  p = Mul(x, a)
  y = Mul(p, half)
""",
    "x_x_x": """
  x2 = Mul(x, x)
  c = Mul(x2, x)
  k = Mul(cubic, c)
  s = Add(k, x)
  t = Mul(s2pi, s)
  e = Tanh(t)
  a = Add(one, e)
  h = Mul(x, half)
  y = Mul(h, a)
""",
}
G_INITS = {
    "sqrt2": np.float32(1.4142135381698608),
    "inv_sqrt2": np.float32(0.7071),
    "one": np.float32(1.0),
    "half": np.float32(0.5),
    "three": np.float32(3.0),
    "cubic": np.float32(0.044715),
    "s2pi": np.float32(0.7978845608),
}


def _gelu(body, opset=17, inputs="float[B, S, 8] x", inits=None):
    used = {k: v for k, v in (inits or G_INITS).items() if k in body}
    return _model(body, used, inputs, opset=opset)


@pytest.mark.parametrize("form", sorted(ERF_FORMS) + sorted(TANH_FORMS))
@pytest.mark.parametrize("target,opset", [("cpu", 17), ("openvino", 20)])
def test_gelu_forms_become_one_op(form, target, opset):
    tanh = form in TANH_FORMS
    m = _gelu({**ERF_FORMS, **TANH_FORMS}[form], opset)
    out, res = _fuse(m, target)
    want = ("FastGelu" if tanh else "Gelu") if target == "cpu" else "Gelu"
    assert _ops(out) == [want] and res.stats["gelu_fused"] == 1
    node = out.graph.node[0]
    assert node.domain == ("com.microsoft" if target == "cpu" else "")
    if target == "openvino":
        assert [a.s for a in node.attribute] == [b"tanh" if tanh else b"none"]
    _same(m, out, {"x": _x(2, 5, H)}, atol=1e-4 if target == "openvino" and tanh else 1e-5)
    check_pass_contract("fuse", m, settings={"target": target})


def test_gelu_left_for_openvino_before_opset_20_and_said_so():
    m = _gelu(ERF_FORMS["div_mul_x_then_half"], 17)
    out, res = _fuse(m, "openvino")
    assert "Erf" in _ops(out) and res.stats["gelu_left_decomposed"] == 1 and not res.changed
    assert "opset >= 20" in res.skipped[0]["reason"] and "com.microsoft" in res.skipped[0]["reason"]
    assert all(n.domain == "" for n in out.graph.node)


@pytest.mark.parametrize(
    "change",
    [
        ("u = Div(x, sqrt2)", "u = Div(x, two)"),  # not sqrt(2)
        ("y = Mul(p, half)", "y = Mul(p, one)"),  # not 0.5
        ("a = Add(e, one)", "a = Add(e, half)"),  # not 1 + erf
        ("p = Mul(x, a)", "p = Mul(z, a)"),  # another tensor than x
    ],
)
def test_gelu_not_fused_when_the_pattern_differs(change):
    body = ERF_FORMS["div_mul_x_then_half"].replace(*change)
    inputs = "float[B, S, 8] x, float[B, S, 8] z" if "z" in change[1] else "float[B, S, 8] x"
    m = _gelu(body, inputs=inputs, inits={**G_INITS, "two": np.float32(2.0)})
    out, res = _fuse(m)
    assert "Erf" in _ops(out) and res.stats["gelu_fused"] == 0


def test_gelu_not_fused_when_erf_output_is_read_elsewhere():
    m = _model(ERF_FORMS["div_mul_x_then_half"], G_INITS, "float[B, S, 8] x", "float[B, S, 8] y, float[B, S, 8] e")
    out, _ = _fuse(m)
    assert "Erf" in _ops(out)


BIAS_BODY = """
  mm = MatMul(x, w)
  xb = Add(bias, mm)
"""


@pytest.mark.parametrize("form,fused", [("div_mul_x_then_half", "BiasGelu"), ("pow3", "FastGelu")])
def test_bias_add_before_gelu_goes_into_the_op(form, fused):
    body = BIAS_BODY + {**ERF_FORMS, **TANH_FORMS}[form].replace("x", "xb").replace("xbxb", "xx")
    inits = {**G_INITS, "w": RNG.standard_normal((4, H)) * 0.5, "bias": RNG.standard_normal(H)}
    m = _gelu(body, inputs="float[B, S, 4] x", inits=inits)
    out, res = _fuse(m)
    assert _ops(out) == ["MatMul", fused] and len(out.graph.node[1].input) == 2
    assert res.stats["bias_gelu_fused"] == 1
    _same(m, out, {"x": _x(2, 3, 4)})


def test_bias_stays_when_the_biased_tensor_has_another_reader():
    body = BIAS_BODY + ERF_FORMS["div_mul_x_then_half"].replace("x", "xb")
    inits = {**G_INITS, "w": RNG.standard_normal((4, H)), "bias": RNG.standard_normal(H)}
    m = _model(
        body, {k: v for k, v in inits.items() if k in body}, "float[B, S, 4] x", "float[B, S, 8] y, float[B, S, 8] xb"
    )
    out, res = _fuse(m)
    assert _ops(out) == ["MatMul", "Add", "Gelu"] and res.stats["gelu_fused"] == 1


def test_gelu_inside_an_if_branch_is_fused():
    branch = ERF_FORMS["div_mul_x_then_half"]
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[B, 8] x) => (float[B, 8] y)
<float sqrt2 = {{1.41421354}}, float one = {{1.0}}, float half = {{0.5}}>
{{
  y = If(c) <then_branch = t () => (float[B, 8] y1) {{ {branch.replace("y = ", "y1 = ")} }},
             else_branch = f () => (float[B, 8] y2) {{ y2 = Identity(x) }}>
}}"""
    m = _raw(parse(text))
    out, res = _fuse(m)
    assert res.stats["gelu_fused"] == 1 and res.stats["in_subgraphs"] == 1
    _same(m, out, {"c": np.array(True), "x": _x(3, H)})


# ---- SkipLayerNormalization

SKIP_BODY = """
  s = Add(a, b)
  y = LayerNormalization <axis = -1, epsilon = 1e-6> (s, gamma, beta)
"""
S_INITS = {"gamma": GAMMA, "beta": BETA}


def _skip(body=SKIP_BODY, inputs="float[B, S, 8] a, float[B, S, 8] b", inits=None, outputs="float[B, S, 8] y"):
    inits = S_INITS if inits is None else inits
    return _model(body, {k: v for k, v in inits.items() if k in body}, inputs, outputs)


def test_add_and_layernorm_become_skip_layernorm_on_cpu_only():
    m = _skip()
    out, res = _fuse(m, "cpu")
    assert _ops(out) == ["SkipLayerNormalization"] and res.stats["skip_layernorm_fused"] == 1
    _same(m, out, {"a": _x(2, 5, H), "b": _x(2, 5, H)})
    check_pass_contract("fuse", m, settings={"target": "cpu"})
    out, res = _fuse(m, "openvino")
    assert _ops(out) == ["Add", "LayerNormalization"] and not res.changed


def test_skip_layernorm_takes_the_bias_and_keeps_the_residual():
    body = """
  mm = MatMul(a, w)
  ab = Add(mm, bias)
  s = Add(b, ab)
  y = LayerNormalization <axis = -1> (s, gamma, beta)
  r = Relu(s)
"""
    inits = {**S_INITS, "w": RNG.standard_normal((4, H)), "bias": RNG.standard_normal(H)}
    m = _skip(body, "float[B, S, 4] a, float[B, S, 8] b", inits, "float[B, S, 8] y, float[B, S, 8] r")
    out, res = _fuse(m)
    assert _ops(out) == ["MatMul", "SkipLayerNormalization", "Relu"]
    skip = out.graph.node[1]
    assert len(skip.input) == 5 and skip.output[3] == "s"
    _same(m, out, {"a": _x(2, 3, 4), "b": _x(2, 3, H)})


def test_skip_layernorm_on_2d_tensors():
    m = _skip(inputs="float[N, 8] a, float[N, 8] b", outputs="float[N, 8] y")
    out, _ = _fuse(m)
    assert _ops(out) == ["SkipLayerNormalization"]
    _same(m, out, {"a": _x(6, H), "b": _x(6, H)})


@pytest.mark.parametrize(
    "inputs,body,inits",
    [
        ("float[B, S, 8] a, float[1, S, 8] b", SKIP_BODY, None),  # a broadcast
        ("float[B, S, 8] a, float[B, S, 8] b, float[8] gamma", SKIP_BODY, {"beta": BETA}),  # dynamic gamma
        ("float[B, S, 8] a, float[B, S, 8] b", SKIP_BODY.replace("axis = -1", "axis = 1"), None),  # not last
        ("float[B, C, S, 8] a, float[B, C, S, 8] b", SKIP_BODY, None),  # rank 4
    ],
)
def test_skip_layernorm_not_fused_when_onnxruntime_would_not_take_it(inputs, body, inits):
    if "axis = 1" in body:
        inits = {"gamma": RNG.uniform(size=(1, 8)), "beta": RNG.standard_normal((1, 8))}
    outputs = "float[B, C, S, 8] y" if "C" in inputs else "float[B, S, 8] y"
    m = _skip(body, inputs, inits, outputs)
    out, res = _fuse(m)
    assert "SkipLayerNormalization" not in _ops(out) and res.stats["skip_layernorm_fused"] == 0


def test_skip_layernorm_after_decomposed_layernorm_in_one_run():
    body = "  x = Add(a, b)\n" + LN_BODY
    m = _model(body, LN_INITS, "float[B, S, 8] a, float[B, S, 8] b")
    out, res = _fuse(m)
    assert _ops(out) == ["SkipLayerNormalization"]
    assert res.stats["layernorm_fused"] == 1 and res.stats["skip_layernorm_fused"] == 1
    _same(m, out, {"a": _x(2, 3, H), "b": _x(2, 3, H)})
