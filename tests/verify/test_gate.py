"""The save gate: every saved model passes onnx.checker (full), keeps the original's whole signature and
loads in onnxruntime; what fails is not written and the CLI exits 3 with a reproducer. Also the
export fixes that keep signatures whole, input-caused check failures (exit 2, `--input-value`) and
Sequence inputs/outputs under `--check`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import parse, run_model
from onnx import TensorProto, helper

import onnxopt
from onnxopt.cli import main
from onnxopt.cli.errors import save_reproducer
from onnxopt.errors import UserError
from onnxopt.framework import registry
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.verify.gate import GateFailed, Reference, gate, signature, signature_changes


def _seqlen_model() -> onnx.ModelProto:
    """Output `y: [1, 'seqlen']` also listed in value_info without a shape (as some exporters write it),
    with doc strings on the model, the graph, a node and the input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seqlen"], doc_string="audio frames")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["t"], name="scale", doc_string="scales the input"),
        helper.make_node("Relu", ["t"], ["y"], name="relu"),
    ]
    g = helper.make_graph(nodes, "g", [x], [y], [c], doc_string="graph doc")
    g.value_info.append(helper.make_value_info("y", helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], doc_string="model doc")
    onnx.checker.check_model(m, full_check=True)
    return m


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_output_in_value_info_without_shape_keeps_its_shape(tmp_path, capsys):
    onnx.save(_seqlen_model(), str(tmp_path / "m.onnx"))
    out = tmp_path / "o.onnx"
    assert (
        main(["optimize", str(tmp_path / "m.onnx"), "-o", str(out), "-p", "fold,fuse", "--check", "2", "--quiet"]) == 0
    )
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.output[0].type.tensor_type.HasField("shape") and _dims(m.graph.output[0]) == [1, "seqlen"]
    assert signature(m) == signature(_seqlen_model())


def test_doc_strings_survive(tmp_path):
    m = onnxopt.optimize(_seqlen_model(), pipeline="fold,fuse").model
    assert (m.doc_string, m.graph.doc_string) == ("model doc", "graph doc")
    assert {n.name: n.doc_string for n in m.graph.node}["scale"] == "scales the input"
    assert m.graph.input[0].doc_string == "audio frames"


class _CorruptSignature(Pass):
    """Test plugin: renames the symbolic axis of the first output (a broken rewrite the gate must stop)."""

    def run(self, graph, ctx) -> PassResult:
        graph.outputs[0].shape = [1, "renamed"]
        return PassResult(changed=True)


class _BreakModel(Pass):
    """Test plugin: feeds a float tensor to Not (a model onnx.checker rejects)."""

    def run(self, graph, ctx) -> PassResult:
        import onnx_graphsurgeon as gs

        bad = gs.Variable("bad", dtype=np.bool_, shape=[1, "seqlen"])
        graph.nodes.append(gs.Node("Not", name="broken", inputs=[graph.inputs[0]], outputs=[bad]))
        graph.outputs.append(bad)
        return PassResult(changed=True)


@pytest.fixture()
def bad_passes(monkeypatch):
    """Register the two corrupting passes for one test only (never seen by the contract tests)."""
    registry.load_passes()
    for name, cls in (("test_corrupt_signature", _CorruptSignature), ("test_break_model", _BreakModel)):
        monkeypatch.setattr(cls, "name", name)
        monkeypatch.setitem(registry._PASSES, name, cls)
        monkeypatch.setitem(registry.PASS_ORIGINS, name, "tests")


@pytest.mark.parametrize(
    "pipeline,mentions", [("fold,test_corrupt_signature", "signature"), ("fold,test_break_model", "checker")]
)
def test_gate_failure_exits_3_writes_nothing_and_saves_a_reproducer(
    pipeline, mentions, bad_passes, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("ONNXOPT_HOME", str(tmp_path / "home"))
    onnx.save(_seqlen_model(), str(tmp_path / "m.onnx"))
    (tmp_path / "out").mkdir()
    code = main(
        [
            "optimize",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "out" / "o.onnx"),
            "-p",
            pipeline,
            "--report",
            str(tmp_path / "out" / "r.json"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert len(err) == 1 and mentions in err[0] and "nothing written" in err[0], err
    assert list((tmp_path / "out").iterdir()) == []
    repro = list((tmp_path / "home" / "crashes").iterdir())
    assert len(repro) == 1 and (repro[0] / "rejected.onnx").is_file() and (repro[0] / "m.onnx").is_file()


def test_gate_in_the_api_refuses_to_save(bad_passes, tmp_path):
    result = onnxopt.optimize(_seqlen_model(), pipeline="test_corrupt_signature")
    with pytest.raises(GateFailed, match="output 'y': shape \\[1, 'seqlen'\\] became \\[1, 'renamed'\\]"):
        result.save(tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_optimize_many_gate_failure_exits_3(bad_passes, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXOPT_HOME", str(tmp_path / "home"))
    onnx.save(_seqlen_model(), str(tmp_path / "a.onnx"))
    onnx.save(_seqlen_model(), str(tmp_path / "b.onnx"))
    (tmp_path / "fleet.toml").write_text(
        '[defaults]\noutput_dir = "out"\n[[model]]\ninput = "a.onnx"\n'
        '[[model]]\ninput = "b.onnx"\npipeline = "fold,test_corrupt_signature"\n'
    )
    assert main(["optimize-many", str(tmp_path / "fleet.toml")]) == 3
    assert "b: rejected" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.opt.onnx"]


def _sig(inputs, outputs):
    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", *inputs)],
            [helper.make_tensor_value_info("y", *outputs)],
        )
    )
    return signature(m)


def test_signature_rules():
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    ref = _sig((f, ["n", 3]), (f, ["n", 3]))
    assert signature_changes(ref, ref) == []
    assert "dtype" in signature_changes(ref, _sig((f, ["n", 3]), (i64, ["n", 3])))[0]
    assert "became [?, 3]" in signature_changes(ref, _sig((f, ["n", 3]), (f, [None, 3])))[0]
    assert "became ['m', 3]" in signature_changes(ref, _sig((f, ["n", 3]), (f, ["m", 3])))[0]
    assert "became no shape" in signature_changes(ref, _sig((f, ["n", 3]), (f, None)))[0]
    assert "became [3]" in signature_changes(ref, _sig((f, ["n", 3]), (f, [3])))[0]
    pinned = _sig((f, [4, 3]), (f, [4, 3]))
    assert len(signature_changes(ref, pinned)) == 2  # a symbolic axis turned static: only when pinned
    assert signature_changes(ref, pinned, {"x": (4, 3)}) == []
    assert "input 'x'" in signature_changes(ref, pinned, {"x": (5, 3)})[0]
    assert signature_changes(_sig((f, [None, 3]), (f, [None, 3])), _sig((f, [None, 3]), (f, ["n", 3]))) == []


def test_gate_relaxes_a_check_the_original_fails_too():
    """An original whose declared output shape contradicts inference fails onnx.checker's full check: the
    result is judged by what the tool changed (the plain check), not refused for the original's fault."""
    m = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 4] y) { y = Relu (x) }""")
    onnx.checker.check_model(m)
    with pytest.raises(Exception, match="differ"):
        onnx.checker.check_model(m, full_check=True)
    result = onnxopt.optimize(m, pipeline="fold,fuse")
    gate(result.model, result.reference)
    with pytest.raises(GateFailed, match="checker"):
        gate(result.model)  # no original to compare with: the full check stands


SR_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
vad (float[1, n] x, int64 sr) => (float[1, n] y) {
  c16 = Constant <value = int64 {16000}> ()
  is16 = Equal (sr, c16)
  y = If <then_branch = g1 () => (float[1, n] a) { a = Identity (x) },
          else_branch = g2 () => (float[m, k] b) {
             c8 = Constant <value = int64 {8000}> ()
             is8 = Equal (sr, c8)
             b = If <then_branch = g3 () => (float[1, n] d) { d = Relu (x) },
                     else_branch = g4 () => (float[m, 7] e) {
                        bad = Constant <value = int64[2] {-1, 7}> ()
                        e = Reshape (x, bad) }> (is8) }> (is16)
}"""


def test_original_failing_on_generated_inputs_is_a_user_error(tmp_path, capsys):
    """A control input (a sample rate that must be 8000 or 16000) random in the check: exit 2 naming it."""
    onnx.save(parse(SR_MODEL), str(tmp_path / "vad.onnx"))
    argv = ["optimize", str(tmp_path / "vad.onnx"), "-o", str(tmp_path / "o.onnx"), "--check", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "original model itself fails" in err[0], err
    assert "input 'sr'" in err[0] and "--input-value sr=" in err[0] and "8000, 16000" in err[0], err
    assert not (tmp_path / "o.onnx").exists()
    assert main([*argv, "--input-value", "sr=8000", "--quiet"]) == 0
    assert main([*argv, "--input-value", "sr=16000", "--quiet"]) == 0
    for bad, mentions in (
        ("sr=8000.5", "whole numbers"),
        ("rate=8000", "no input"),
        ("sr", "NAME=VALUE"),
        ("sr=abc", "NAME=VALUE"),
    ):
        capsys.readouterr()
        assert main([*argv, "--input-value", bad]) == 2, bad
        assert mentions in capsys.readouterr().err


def test_input_values_are_cast_and_broadcast():
    from onnxopt.data.samples import parse_input_values, seeded_inputs

    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1, n] x, int64 sr, int32[3] ids) => (float[1, n] y) { y = Relu (x) }""")
    values = parse_input_values(["sr=16000", "ids=1,2,3"])
    s = seeded_inputs(m, 2, values=values)
    assert s[0]["sr"].dtype == np.int64 and s[0]["sr"].shape == () and int(s[0]["sr"]) == 16000
    np.testing.assert_array_equal(s[1]["ids"], np.array([1, 2, 3], np.int32))
    with pytest.raises(UserError, match="do not fit"):
        seeded_inputs(m, 1, values=parse_input_values(["ids=1,2"]))


def test_original_failing_on_calibration_data_is_a_user_error():
    with pytest.raises(UserError, match="fails on the calibration data"):
        onnxopt.optimize(
            parse(SR_MODEL),
            pipeline="fold",
            check=1,
            calibration=[{"x": np.ones((1, 64), np.float32), "sr": np.array(3, np.int64)}],
        )


def _sequence_model() -> onnx.ModelProto:
    s = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2, 3])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    so = helper.make_tensor_sequence_value_info("so", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    nodes = [
        helper.make_node("SequenceInsert", ["s", "x"], ["so"], name="insert"),
        helper.make_node("ConcatFromSequence", ["so"], ["y"], axis=0, name="concat"),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [s, x], [so, y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_sequence_inputs_and_outputs_under_check(tmp_path, capsys):
    onnx.save(_sequence_model(), str(tmp_path / "seq.onnx"))
    assert (
        main(
            [
                "optimize",
                str(tmp_path / "seq.onnx"),
                "-o",
                str(tmp_path / "o.onnx"),
                "--check",
                "2",
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert signature(out) == signature(_sequence_model())  # the element shape [2, 3] included
    assert '"so[2]"' in (tmp_path / "r.json").read_text()  # the sequence's elements were compared
    feeds = {"s": [np.ones((2, 3), np.float32)], "x": np.zeros((2, 3), np.float32)}
    np.testing.assert_array_equal(run_model(out, feeds)[1], run_model(_sequence_model(), feeds)[1])


def test_reproducers_of_the_same_second_do_not_overwrite_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_HOME", str(tmp_path))
    dirs = {save_reproducer(["optimize", f"run{i}"], RuntimeError(f"crash {i}")) for i in range(3)}
    assert len(dirs) == 3
    assert sorted((d / "traceback.txt").read_text().strip().splitlines()[-1] for d in dirs) == [
        f"RuntimeError: crash {i}" for i in range(3)
    ]


def test_gs_warnings_never_reach_stdout(tmp_path, capsys, monkeypatch):
    """onnx-graphsurgeon prints its warnings to stdout: the CLI sends them to stderr, none under --quiet."""
    from onnx_graphsurgeon.logger import G_LOGGER

    class _Warns(Pass):
        def run(self, graph, ctx) -> PassResult:
            G_LOGGER.warning("a gs warning from inside a pass")
            return PassResult(changed=False, reason="only warns")

    registry.load_passes()
    monkeypatch.setattr(_Warns, "name", "test_warns")
    monkeypatch.setitem(registry._PASSES, "test_warns", _Warns)
    monkeypatch.setattr(G_LOGGER, "severity", G_LOGGER.severity)
    onnx.save(_seqlen_model(), str(tmp_path / "m.onnx"))
    argv = ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "test_warns"]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "gs warning" not in captured.err
    monkeypatch.setattr(G_LOGGER, "severity", G_LOGGER.INFO)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "gs warning" not in captured.out and "gs warning" in captured.err


def test_reference_only_loaded_when_needed(tmp_path):
    """The gate reads the original again only when the result fails a check (cheap on the good path)."""
    path = tmp_path / "m.onnx"
    onnx.save(_seqlen_model(), str(path))
    result = onnxopt.optimize(path, pipeline="fold,fuse")
    result.save(tmp_path / "o.onnx")
    assert result.reference._original is None
    assert Path(result.report["output"]).is_file()


def test_optional_input_under_check(tmp_path, capsys):
    tt = helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])
    o = helper.make_value_info("o", helper.make_optional_type_proto(tt))
    nodes = [
        helper.make_node("OptionalGetElement", ["o"], ["y"], name="get"),
        helper.make_node("OptionalHasElement", ["o"], ["h"], name="has"),
    ]
    m = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [o],
            [
                helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                helper.make_tensor_value_info("h", TensorProto.BOOL, []),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(tmp_path / "opt.onnx"))
    assert (
        main(["optimize", str(tmp_path / "opt.onnx"), "-o", str(tmp_path / "o.onnx"), "--check", "2", "--quiet"]) == 0
    ), capsys.readouterr().err
    assert signature(onnx.load(str(tmp_path / "o.onnx"))) == signature(m)


def test_map_input_is_a_user_error_under_check(tmp_path, capsys):
    """A map input cannot be generated: one line, exit 2, not an internal error."""
    from onnxopt.data.samples import seeded_inputs

    m = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                helper.make_value_info(
                    "m",
                    helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])),
                ),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(UserError, match="input 'm' is a map"):
        seeded_inputs(m, 1)


def _initializer_listed_as_input(ir_version: int) -> onnx.ModelProto:
    """y = x + b with b an initializer that is also listed as a graph input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    init = helper.make_tensor("b", TensorProto.FLOAT, [2], [1.0, 2.0])
    g = helper.make_graph(
        [
            helper.make_node("Add", ["x", "b"], ["y"], name="add"),
        ],
        "g",
        [x, b],
        [y],
        [init],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


@pytest.mark.parametrize("ir_version, overridable", [(3, False), (8, True)])
def test_initializers_listed_as_inputs_follow_the_ir_version(ir_version, overridable):
    """IR >= 4: an initializer listed as an input is an overridable default, kept in the signature.
    IR < 4 listed every initializer as an input (as onnxruntime reads it, they are constants)."""
    m = _initializer_listed_as_input(ir_version)
    assert [v.name for v in signature(m).inputs] == (["x", "b"] if overridable else ["x"])
    out = onnxopt.optimize(m, pipeline="fold,fuse").model
    gate(out, Reference(signature(m)))  # signature kept, in both cases
    assert ("b" in [v.name for v in out.graph.input]) == overridable


#: Reflect padding by 100 needs more than 100 samples: the check's default size for a dynamic axis (64)
#: makes the original fail even with its sample rate fixed.
NEEDS_LONG_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, T] x, int64 sr) => (float[N, U] y) {
    pads = Constant <value = int64[4] {0, 100, 0, 100}> ()
    p = Pad <mode = "reflect"> (x, pads)
    s = Cast <to = 1> (sr)
    y = Mul (p, s)
}
"""


def test_a_fixed_input_is_not_blamed_the_dynamic_sizes_are(tmp_path, capsys):
    onnx.save(parse(NEEDS_LONG_INPUT), str(tmp_path / "m.onnx"))
    argv = [
        "optimize",
        str(tmp_path / "m.onnx"),
        "-o",
        str(tmp_path / "o.onnx"),
        "--check",
        "2",
        "--input-value",
        "sr=16000",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dynamic axes" in err[0] and "x [1, 64]" in err[0] and "'sr'" not in err[0], err
    assert main([*argv, "--input-shape", "x=1x512", "--quiet"]) == 0
