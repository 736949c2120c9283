"""Pinned input shapes (`--input-shape`): parsing, checks (exit 2), the rewrite, and what folding gains."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import parse, run_model

import onnxopt
from onnxopt.analysis.shapes import parse_input_shapes
from onnxopt.cli import main
from onnxopt.data.pinning import check_pinnable, pin_input_shapes
from onnxopt.errors import UserError

#: Shape arithmetic on a dynamic input, as exporters write it: Reshape(x, [N, C*H*W]) through
#: Shape -> Gather -> Mul -> Concat, then a MatMul plus a tensor of ones of shape [N, 4] made by
#: ConstantOfShape. Dynamic, the ones (and the shape arithmetic feeding them) cannot fold.
SHAPE_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 3, H, W] x) => (float[N, 4] y) <float[12, 4] w = {0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3,4,5,6,7,8,9,10,11,
                                               0,1,2,3,4,5,6,7,8,9,10,11,0,1,2,3,4,5,6,7,8,9,10,11}> {
    s = Shape (x)
    i0 = Constant <value = int64[1] {0}> ()
    i2 = Constant <value = int64[1] {2}> ()
    i3 = Constant <value = int64[1] {3}> ()
    n = Gather <axis = 0> (s, i0)
    h = Gather <axis = 0> (s, i2)
    wd = Gather <axis = 0> (s, i3)
    hw = Mul (h, wd)
    three = Constant <value = int64[1] {3}> ()
    chw = Mul (hw, three)
    tgt = Concat <axis = 0> (n, chw)
    r = Reshape (x, tgt)
    m = MatMul (r, w)
    four = Constant <value = int64[1] {4}> ()
    bshape = Concat <axis = 0> (n, four)
    ones = ConstantOfShape <value = float[1] {1}> (bshape)
    y = Add (m, ones)
}
"""


def _inputs(model: onnx.ModelProto) -> dict[str, list]:
    return {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }


def _outputs(model: onnx.ModelProto) -> dict[str, list]:
    return {
        o.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }


@pytest.mark.parametrize(
    "specs, expected",
    [
        (["x=1x3x48x320"], {"x": (1, 3, 48, 320)}),
        (["x:1,3,48,320"], {"x": (1, 3, 48, 320)}),  # onnxsim/onnxslim spelling
        (["a:1,3 b=2x5"], {"a": (1, 3), "b": (2, 5)}),  # several in one flag, as onnxslim's nargs
        (["a=1x3;b:2,5", "c=7"], {"a": (1, 3), "b": (2, 5), "c": (7,)}),
        (["input:0=1x2"], {"input:0": (1, 2)}),  # TensorFlow-style names keep their colon
        (["input:0:1,2"], {"input:0": (1, 2)}),
        (["my input=1X2"], {"my input": (1, 2)}),
    ],
)
def test_parse_input_shapes_accepts_both_spellings(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["x", "x=", "=1x2", "x=1xa", "x=1x0", "x=-1x3", "x:1,,3", "x=1x2 x=1x3"])
def test_parse_input_shapes_rejects_bad_specs(spec):
    with pytest.raises(UserError, match="--input-shape"):
        parse_input_shapes([spec])


def test_pin_checks_names_ranks_and_static_dims():
    model = parse(SHAPE_CHAIN)
    for shapes, message in [
        ({"z": (1, 3, 8, 8)}, "no such input"),
        ({"w": (12, 4)}, "no such input"),  # an initializer is not an input to pin
        ({"x": (1, 3, 8)}, "rank 4"),
        ({"x": (1, 4, 8, 8)}, "axis 1 is static 3"),
        ({"x": (1, 3, 0, 8)}, "positive"),
    ]:
        with pytest.raises(UserError, match=message):
            check_pinnable(model, shapes)
    check_pinnable(model, {"x": (2, 3, 8, 8)})


def test_pin_rewrites_inputs_and_outputs_that_become_static():
    model = parse(SHAPE_CHAIN)
    pinned = pin_input_shapes(model, {"x": (2, 3, 2, 2)})
    onnx.checker.check_model(model, full_check=True)
    assert _inputs(model)["x"] == [2, 3, 2, 2]
    assert _outputs(model)["y"] == [2, 4]
    assert pinned.to_dict() == {"inputs": {"x": [2, 3, 2, 2]}, "outputs": {"y": [2, 4]}}
    assert pinned.expected_dims("y", ("N", 4)) == (2, 4)
    assert pinned.expected_dims("other", ("N",)) == ("N",)
    assert pin_input_shapes(model, None).to_dict() == {"inputs": {}, "outputs": {}}


def test_pinned_shapes_let_fold_finish_the_shape_arithmetic():
    model = parse(SHAPE_CHAIN)
    dynamic = onnxopt.optimize(model, pipeline="fold").model
    pinned = onnxopt.optimize(model, pipeline="fold", input_shapes={"x": (2, 3, 2, 2)})
    assert {n.op_type for n in dynamic.graph.node} >= {"Shape", "ConstantOfShape"}  # N stays dynamic
    assert [n.op_type for n in pinned.model.graph.node] == ["Reshape", "MatMul", "Add"]
    reshape = pinned.model.graph.node[0]
    target = next(i for i in pinned.model.graph.initializer if i.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [2, 12]
    assert pinned.report["pinned"] == {"inputs": {"x": [2, 3, 2, 2]}, "outputs": {"y": [2, 4]}}
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(run_model(pinned.model, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-6)


def test_cli_pins_and_the_saved_model_passes_the_gate(tmp_path):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(parse(SHAPE_CHAIN), str(src))
    code = main(
        [
            "optimize",
            str(src),
            "-o",
            str(out),
            "-p",
            "fold,fuse",
            "--input-shape",
            "x:2,3,2,2",
            "--check",
            "2",
            "--report",
            str(rep),
            "--quiet",
        ]
    )
    assert code == 0
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert _inputs(m) == {"x": [2, 3, 2, 2]} and _outputs(m) == {"y": [2, 4]}
    report = json.loads(rep.read_text())
    assert report["pinned"]["inputs"] == {"x": [2, 3, 2, 2]} and report["check"]["ok"]


def test_cli_without_input_shape_keeps_dynamic_axes(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(parse(SHAPE_CHAIN), str(src))
    assert main(["optimize", str(src), "-o", str(out), "-p", "fold", "--quiet"]) == 0
    m = onnx.load(str(out))
    assert _inputs(m) == {"x": ["N", 3, "H", "W"]} and _outputs(m) == {"y": ["N", 4]}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("z=1x3x4x5", "no such input"),
        ("x=1x3x4", "rank 4"),
        ("x=1x5x4x5", "static 3"),
        ("x=1x3x0x5", "positive"),
    ],
)
def test_cli_bad_pins_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, spec, message):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(parse(SHAPE_CHAIN), str(src))
    code = main(["optimize", str(src), "-o", str(out), "--input-shape", spec])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert message in err and len(err.splitlines()) == 1


def test_an_output_declared_minus_one_gets_its_size_once_folded(tmp_path):
    """PP-OCR cls declares its output [-1, 2] and computes its batch through shape arithmetic that
    inference cannot follow (here: Max). Pinned, fold makes the size 1 computable: the -1 left in
    place made `onnx.checker` reject the result; it becomes unknown at pinning, static after the passes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n0"]),
        helper.make_node("Max", ["n0", "zero"], ["n"]),
        helper.make_node("Concat", ["n", "c12"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("zero", 0), ("one", 1), ("c12", 12))]
    inits.append(numpy_helper.from_array(np.ones((12, 2), np.float32), "w"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    early = onnx.ModelProto()
    early.CopyFrom(model)
    assert pin_input_shapes(early, {"x": (1, 3, 2, 2)}).outputs == {}  # inference alone cannot size it
    assert _outputs(early)["y"] == ["", 2]  # the -1 is gone: an unknown dim
    result = onnxopt.optimize(model, pipeline="fold,fuse", input_shapes={"x": (1, 3, 2, 2)})
    assert result.report["pinned"]["outputs"] == {"y": [1, 2]}
    result.save(tmp_path / "o.onnx")  # the save gate: checker (full), signature, onnxruntime load
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_inspect_and_validate_refuse_unknown_or_wrong_pins(tmp_path, capsys, command):
    """`--input-shape` naming no input (or with the wrong rank) is an error in every command, never ignored."""
    src = tmp_path / "m.onnx"
    onnx.save(parse(SHAPE_CHAIN), str(src))
    args = [str(src)] if command == "inspect" else [str(src), str(src), "--ep", "cpu"]
    for spec, message in (("z=1x3x4x5", "no such input"), ("x=1x3x4", "rank 4")):
        code = main([command, *args, "--input-shape", spec])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1


#: One If branch squeezes axis 1, so it only suits inputs [N, 1]; dynamic, the model loads, and the
#: other branch runs. Pinned to [1, 512], onnxruntime's load-time inference rejects that branch
#: (the structure of a voice-activity model whose branches serve two sample rates).
BRANCH_FOR_OTHER_SIZES = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, D] x, bool c) => (float[M] y) {
    y = If (c) <then_branch = g1 () => (float[M] t) {
        ax = Constant <value = int64[1] {1}> ()
        t = Squeeze (x, ax)
    }, else_branch = g2 () => (float[M] e) {
        ax1 = Constant <value = int64[1] {1}> ()
        e = ReduceSum <keepdims = 0> (x, ax1)
    }>
}
"""


def test_pins_that_make_the_model_unloadable_are_a_user_error(tmp_path, capsys):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(parse(BRANCH_FOR_OTHER_SIZES), str(src))
    assert main(["optimize", str(src), "-o", str(out), "--quiet"]) == 0
    code = main(["optimize", str(src), "-o", str(out.with_name("p.onnx")), "--input-shape", "x=1x512"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no longer loads in onnxruntime" in err and len(err.splitlines()) == 1
    assert not out.with_name("p.onnx").exists()
