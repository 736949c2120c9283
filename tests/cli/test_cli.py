"""The command line: optimize/inspect/passes, exit codes, reports, plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from conftest import LIGHT, PPOCR, ROOT, real_model

from onnxopt.cli import main

ALL_MODELS = [*PPOCR, *LIGHT]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_optimize_fold_fuse_check_on_every_real_model(name, tmp_path, capsys):
    src = real_model(name)
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    code = main(["optimize", str(src), "-o", str(out), "-p", "fold,fuse", "--check", "3", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    orig = onnx.load(str(src))
    inits = {i.name for i in orig.graph.initializer}
    real_inputs = [(i.name, i.type.SerializeToString()) for i in orig.graph.input if i.name not in inits]
    assert [(i.name, i.type.SerializeToString()) for i in m.graph.input] == real_inputs
    r = json.loads(report.read_text())
    assert r["check"]["ok"] and r["check"]["tolerance"] == "exact"
    assert r["after"]["nodes"] < r["before"]["nodes"]


def test_check_failure_exits_1_and_writes_nothing(tmp_path, capsys):
    from dataclasses import dataclass

    import numpy as np
    import onnx_graphsurgeon as gs

    from onnxopt import Pass, PassResult, register_pass

    @register_pass("test-scale-weights")
    class ScaleWeights(Pass):
        """Deliberately wrong: scales the first Conv weight (used to test --check)."""

        @dataclass
        class Options:
            pass

        def run(self, graph: gs.Graph, ctx):
            conv = next(n for n in graph.nodes if n.op == "Conv")
            w = conv.inputs[1]
            conv.inputs[1] = gs.Constant(w.name + "_scaled", (w.values * 1.5).astype(np.float32))
            return PassResult(changed=True)

    out = tmp_path / "o.onnx"
    code = main(["optimize", str(real_model("cls")), "-o", str(out), "-p", "fold,test-scale-weights", "--check", "2"])
    assert code == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "check failed" in capsys.readouterr().err


def test_inspect_json_and_text(capsys):
    assert main(["inspect", str(real_model("cls")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"]["x"]["dtype"] == "float32" and info["nodes"] == 566 and info["macs"] > 0
    assert main(["inspect", str(real_model("resnet50"))]) == 0
    assert "ConstantOfShape" in capsys.readouterr().out


def test_passes_lists_builtins_and_the_example_plugin(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in ("fold", "fuse"):
        assert f"\n{name}\n" in "\n" + out
    assert "name-nodes  (plugin: onnxopt-example-plugin)" in out, (
        "install the example plugin: pip install -e examples/plugin"
    )


def test_example_plugin_runs_in_a_pipeline(tmp_path):
    src = real_model("cls")
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "-p", "fold,name-nodes{prefix=n_}", "--check", "1"]) == 0
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_broken_plugin_is_listed_with_its_error_and_the_tool_still_works(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onnxopt.passes]\nbroken = broken_plugin_mod\n")
    (site / "broken_plugin_mod.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "passes"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0
    assert "plugin 'broken' failed to load" in proc.stdout and "broken on purpose" in proc.stdout
    assert "\nfold\n" in "\n" + proc.stdout


def test_help_teaches(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "onnxopt optimize model.onnx" in out and "Exit codes" in out
