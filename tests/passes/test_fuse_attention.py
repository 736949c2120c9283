"""The `fuse` pass's attention fusion: decomposed BERT-style self-attention -> com.microsoft Attention.

Models are built here with onnx.helper (random weights, dynamic batch and sequence); the fused
model must match the decomposed one at several batch sizes and sequence lengths with padded keys,
and every variant outside the matched form must be left alone.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from conftest import MODELS, ops, run_model
from onnx import TensorProto, helper, numpy_helper

from onnxopt.ir.graph import export_model, import_model
from onnxopt.testing import apply_pass, check_pass_contract

H, N, D = 16, 4, 4
NEG = float(np.finfo(np.float32).min)


def _c(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype=dtype), name)


class _Builder:
    """Nodes and initializers of one attention model, with the variants the tests need."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", H]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]),
        ]
        self.outputs: list[onnx.ValueInfoProto] = []
        self.k = 0

    def node(self, op, inputs, **attrs):
        self.k += 1
        out = f"{op.lower()}{self.k}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{self.k}_{op}", **attrs))
        return out

    def const(self, arr, dtype=np.float32):
        self.k += 1
        name = f"c{self.k}"
        self.inits.append(_c(name, arr, dtype))
        return name

    def proj(self, x, width=H, weight_input=False):
        w = self.rng.standard_normal((H, width)).astype(np.float32) / math.sqrt(H)
        if weight_input:
            self.k += 1
            wname = f"w{self.k}"
            self.inputs.append(helper.make_tensor_value_info(wname, TensorProto.FLOAT, [H, width]))
        else:
            wname = self.const(w)
        mm = self.node("MatMul", [x, wname])
        return self.node("Add", [self.const(self.rng.standard_normal(width) * 0.1), mm])

    def heads(self, t, perm, d=D, target=None):
        r = self.node("Reshape", [t, self.const(target or [0, 0, N, d], np.int64)])
        return self.node("Transpose", [r], perm=perm)

    def mask_term(self, kind):
        if kind == "sub_mul":
            u = self.node("Unsqueeze", ["mask", self.const([1], np.int64)])
            u = self.node("Unsqueeze", [u, self.const([2], np.int64)])
            f = self.node("Cast", [u], to=TensorProto.FLOAT)
            s = self.node("Sub", [self.const(1.0), f])
            return self.node("Mul", [s, self.const(NEG)])
        if kind == "where":
            u = self.node("Unsqueeze", ["mask", self.const([1, 2], np.int64)])
            eq = self.node("Equal", [u, self.const(0, np.int64)])
            return self.node("Where", [eq, self.const(-1e9), self.const(0.0)])
        if kind == "causal":  # a [S, S] lower-triangular input: not a key-padding mask
            self.inputs.append(helper.make_tensor_value_info("causal", TensorProto.FLOAT, ["S", "S"]))
            return self.node("Unsqueeze", ["causal", self.const([0, 1], np.int64)])
        if kind == "4d":  # an additive mask of unknown form, given whole
            self.inputs.append(helper.make_tensor_value_info("bias4d", TensorProto.FLOAT, ["B", 1, "S", "S"]))
            return "bias4d"
        if kind == "query":  # [B, 1, S, 1]: masks queries, not keys
            u = self.node("Unsqueeze", ["mask", self.const([1, 3], np.int64)])
            f = self.node("Cast", [u], to=TensorProto.FLOAT)
            return self.node("Mul", [self.node("Sub", [self.const(1.0), f]), self.const(-10000.0)])
        raise ValueError(kind)

    def attention(self, x="x", kv=None, scale="div", mask="sub_mul", k_two=False, dv=D, heads_target=None, **kw):
        kv = kv or x
        q = self.proj(x, weight_input=kw.get("weight_input", False))
        qh = self.heads(q, [0, 2, 1, 3], target=heads_target)
        kp = self.proj(kv)
        if scale == "qk":  # D^-1/4 on Q and on K, before the heads split
            qh = self.node("Mul", [qh, self.const(D**-0.25)])
            kp = self.node("Mul", [kp, self.const(D**-0.25)])
        if k_two:
            kh = self.node("Transpose", [self.heads(kp, [0, 2, 1, 3], target=heads_target)], perm=[0, 1, 3, 2])
        else:
            kh = self.heads(kp, [0, 2, 3, 1], target=heads_target)
        vh = self.heads(self.proj(kv, N * dv), [0, 2, 1, 3], d=dv)
        if scale == "q":
            qh = self.node("Mul", [qh, self.const(1 / math.sqrt(D))])
        s = self.node("MatMul", [qh, kh])
        self.scores = s
        if scale == "div":
            s = self.node("Div", [s, self.const(math.sqrt(D))])
        elif scale == "mul":
            s = self.node("Mul", [self.const(1 / math.sqrt(D)), s])
        elif scale == "custom":
            s = self.node("Div", [s, self.const(3.0)])
        if mask != "none":
            s = self.node("Add", [s, self.mask_term(mask)])
        self.probs = self.node("Softmax", [s], axis=-1)
        o = self.node("MatMul", [self.probs, vh])
        o = self.node("Transpose", [o], perm=[0, 2, 1, 3])
        return self.node("Reshape", [o, self.const([0, 0, N * dv], np.int64)])

    def model(self, y, width=H, extra_outputs=(), opset=17):
        outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["B", "S", width])]
        outs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["B", N, "S", "S"]) for t in extra_outputs]
        g = helper.make_graph(self.nodes, "attn", self.inputs, outs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(m, full_check=True)
        return _sorted(m)


def _sorted(model):
    """`model` with its nodes in onnxopt's topological order: the shapes analysis sorts the graph in
    place, which a builder's order would otherwise show as a change of a pass that changed nothing."""
    return export_model(import_model(model))


def _feeds(model, b, s, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int64)
    if b > 1:
        mask[1, s // 2 + 1 :] = 0  # right padding
        if b > 2:
            mask[2, : s // 3] = 0  # left padding
    names = {i.name for i in model.graph.input}
    feeds = {"x": rng.standard_normal((b, s, H)).astype(np.float32), "mask": mask}
    if "causal" in names:
        feeds["causal"] = np.triu(np.full((s, s), -1e9, np.float32), 1)
    if "mem" in names:
        feeds["mem"] = rng.standard_normal((b, s, H)).astype(np.float32)
    return feeds


def _fuse(model, target="cpu"):
    return apply_pass("fuse", model, settings={"target": target})


def _assert_same(model, fused, sizes=((1, 7), (2, 7), (2, 16), (3, 16), (1, 64), (2, 64))):
    for b, s in sizes:
        feeds = _feeds(model, b, s)
        for ref, got in zip(run_model(model, feeds), run_model(fused, feeds)):
            assert ref.shape == got.shape
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"B={b} S={s}")


def _attrs(model, op="Attention"):
    node = next(n for n in model.graph.node if n.op_type == op)
    return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize(
    "scale,mask",
    [("div", "sub_mul"), ("mul", "where"), ("q", "sub_mul"), ("qk", "none"), ("div", "none")],
)
def test_self_attention_becomes_one_attention_op(scale, mask):
    b = _Builder()
    model = b.model(b.attention(scale=scale, mask=mask))
    fused, result = _fuse(model)
    assert result.stats["attention_fused"] == 1
    assert ops(fused).count("Attention") == 1
    assert "Softmax" not in ops(fused) and "Transpose" not in ops(fused)
    node, attrs = _attrs(fused)
    assert node.domain == "com.microsoft" and attrs["num_heads"] == N
    assert "scale" not in attrs  # 1/sqrt(D) is the op's default
    assert any(o.domain == "com.microsoft" for o in fused.opset_import)
    assert (len(node.input) == 4) == (mask != "none")
    _assert_same(model, fused)


def test_padding_mask_is_the_raw_input_cast_to_int32_once_for_all_layers():
    b = _Builder()
    y = b.attention(mask="sub_mul")
    y = b.attention(x=y, mask="sub_mul")
    model = b.model(y)
    fused, result = _fuse(model)
    assert result.stats["attention_fused"] == 2
    casts = [n for n in fused.graph.node if n.op_type == "Cast"]
    assert len(casts) == 1 and casts[0].input[0] == "mask"
    assert {n.input[3] for n in fused.graph.node if n.op_type == "Attention"} == {casts[0].output[0]}
    _attrs_ = _attrs(fused)[1]
    assert _attrs_["mask_filter_value"] == pytest.approx(NEG)
    _assert_same(model, fused)


def test_other_scales_are_passed_as_the_scale_attribute():
    b = _Builder()
    model = b.model(b.attention(scale="custom"))
    fused, result = _fuse(model)
    assert result.stats["attention_fused"] == 1
    assert _attrs(fused)[1]["scale"] == pytest.approx(1 / 3)
    b = _Builder()
    model2 = b.model(b.attention(scale="none"))
    fused2, _ = _fuse(model2)
    assert _attrs(fused2)[1]["scale"] == pytest.approx(1.0)
    _assert_same(model, fused)
    _assert_same(model2, fused2)


def test_k_transposed_in_two_steps_and_a_wider_v():
    b = _Builder()
    model = b.model(b.attention(k_two=True, dv=8), width=N * 8)
    fused, result = _fuse(model)
    assert result.stats["attention_fused"] == 1
    assert _attrs(fused)[1]["qkv_hidden_sizes"] == [H, H, N * 8]
    _assert_same(model, fused)


def test_output_projection_stays_and_contract_holds():
    b = _Builder()
    y = b.attention()
    y = b.node("Add", [b.node("MatMul", [y, b.const(b.rng.standard_normal((H, H)))]), b.const(np.ones(H))])
    model = b.model(y)
    fused, _ = _fuse(model)
    assert ops(fused).count("MatMul") == 1 and ops(fused).count("Attention") == 1
    check_pass_contract("fuse", model, settings={"target": "cpu"}, calibration=[_feeds(model, 2, 7)])


def test_openvino_keeps_attention_decomposed_and_says_so():
    b = _Builder()
    model = b.model(b.attention())
    out, result = _fuse(model, target="openvino")
    assert "Attention" not in ops(out) and "Softmax" in ops(out)
    assert result.stats["attention_fused"] == 0 and result.stats["attention_left_decomposed"] == 1
    assert not result.changed and result.reason
    assert any("openvino" in s["reason"] for s in result.skipped)


@pytest.mark.parametrize("mask", ["causal", "4d", "query"])
def test_masks_other_than_key_padding_are_left_alone(mask):
    b = _Builder()
    model = b.model(b.attention(mask=mask))
    out, result = _fuse(model)
    assert "Attention" not in ops(out) and result.stats["attention_fused"] == 0
    assert any("mask" in s["reason"] for s in result.skipped)


def test_cross_attention_is_left_alone():
    b = _Builder()
    b.inputs.append(helper.make_tensor_value_info("mem", TensorProto.FLOAT, ["B", "S", H]))
    model = b.model(b.attention(kv="mem"))
    out, result = _fuse(model)
    assert "Attention" not in ops(out)
    assert any("cross-attention" in s["reason"] for s in result.skipped)


def test_weights_that_are_inputs_are_left_alone():
    b = _Builder()
    model = b.model(b.attention(weight_input=True))
    out, result = _fuse(model)
    assert "Attention" not in ops(out) and result.stats["attention_fused"] == 0


@pytest.mark.parametrize("where", ["probs", "scores"])
def test_intermediates_read_elsewhere_or_graph_outputs_are_left_alone(where):
    b = _Builder()
    y = b.attention()
    if where == "probs":
        model = b.model(y, extra_outputs=[b.probs])
    else:  # the raw scores feed a second, unrelated consumer
        model = b.model(y, extra_outputs=[b.node("Relu", [b.scores])])
    out, result = _fuse(model)
    assert "Attention" not in ops(out) and result.stats["attention_fused"] == 0
    assert any("read by other nodes" in s["reason"] for s in result.skipped)


def test_heads_that_do_not_split_the_hidden_size_are_left_alone():
    b = _Builder()
    y = b.attention(heads_target=[0, 0, 5, -1])
    g = helper.make_graph(
        b.nodes, "attn", b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], b.inits
    )
    model = _sorted(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    out, result = _fuse(model)
    assert "Attention" not in ops(out)
    assert any("do not split the hidden size" in s["reason"] for s in result.skipped)


def test_attention_option_off():
    b = _Builder()
    model = b.model(b.attention())
    out, result = apply_pass("fuse", model, options={"attention": "false"})
    assert "Attention" not in ops(out) and "attention_fused" not in result.stats


def test_minilm_fuses_three_layers_and_keeps_its_outputs():
    path = MODELS / "minilm.onnx"
    if not path.exists():
        pytest.skip(f"{path} missing: run `python fixtures/fetch_models.py`")
    import onnxopt
    from fixtures.zoo_data import TASKS

    result = onnxopt.optimize(str(path), pipeline="fold,fuse", target="cpu")
    assert ops(result.model).count("Attention") == 3
    feeds = TASKS["minilm"].feeds(16, 1, MODELS)[0]
    feeds = {k: v[:6] for k, v in feeds.items()}
    assert (feeds["attention_mask"] == 0).any()  # padded sentences
    for ref, got in zip(run_model(path, feeds), run_model(result.model, feeds)):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_attention_counts_the_macs_of_the_matmuls_it_replaces():
    from onnxopt.analysis.stats import model_stats

    b = _Builder()
    model = b.model(b.attention(dv=8), width=N * 8)
    fused, _ = _fuse(model)
    shapes = {"x": (2, 7, H), "mask": (2, 7)}
    before, after = (model_stats(m, input_shapes=shapes).to_dict() for m in (model, fused))
    assert after["macs"] == before["macs"] > 0
