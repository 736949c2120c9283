"""`onnxopt optimize-many`: manifest parsing, one task per model, summary, exit codes, identical outputs."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxopt.cli import main
from onnxopt.cli.manifest import load_manifest
from onnxopt.errors import UserError
from tests.conftest import real_model
from tests.scale_tasks import tiny_model


def write_fleet(tmp: Path, out_dir: str, broken: bool = False) -> Path:
    """A manifest over the tiny model, PP-OCR's classifier and (optionally) a corrupt file."""
    onnx.save(tiny_model(), str(tmp / "tiny.onnx"))
    cls = real_model("cls")
    entries = [
        '[[model]]\ninput = "tiny.onnx"\ncheck = 2\n',
        f'[[model]]\ninput = "{cls}"\nname = "cls"\npipeline = "fold"\ninput_shapes = {{ x = [1, 3, 48, 192] }}\n',
    ]
    if broken:
        (tmp / "broken.onnx").write_bytes(b"not a model")
        entries.append('[[model]]\ninput = "broken.onnx"\n')
    path = tmp / f"{out_dir}.toml"
    path.write_text(f'[defaults]\npipeline = "fold,fuse"\noutput_dir = "{out_dir}"\n\n' + "\n".join(entries))
    return path


def test_manifest_paths_defaults_and_errors(tmp_path):
    jobs = load_manifest(write_fleet(tmp_path, "out"))
    assert [j.name for j in jobs] == ["tiny", "cls"]
    assert jobs[0].pipeline == "fold,fuse" and jobs[0].check == 2
    assert jobs[0].output == str((tmp_path / "out" / "tiny.opt.onnx").resolve())
    assert jobs[1].pipeline == "fold" and jobs[1].input_shapes == {"x": (1, 3, 48, 192)}
    bad = tmp_path / "bad.toml"
    for text, msg in [
        ('[[model]]\ninput = "missing.onnx"\n', "not found"),
        ('[[model]]\ninput = "tiny.onnx"\npipline = "fold"\n', "unknown key"),
        ('[[model]]\ninput = "tiny.onnx"\npipeline = "nosuchpass"\n', "model 1"),
        ('[[model]]\ninput = "tiny.onnx"\n[[model]]\ninput = "tiny.onnx"\n', "also the output"),
        ("[defaults]\n", "no [[model]]"),
        ("[[model]\n", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(UserError, match=msg.replace("[", r"\[")):
            load_manifest(bad)


def test_optimize_many_local_1_and_2_processes_byte_identical(tmp_path, capsys):
    for workers, out in (("1", "one"), ("2", "two")):
        assert main(["optimize-many", str(write_fleet(tmp_path, out)), "--workers", workers]) == 0
    table = capsys.readouterr().out
    assert "2/2 models ok" in table and "| tiny" in table
    for name in ("tiny", "cls"):
        one = (tmp_path / "one" / f"{name}.opt.onnx").read_bytes()
        assert one == (tmp_path / "two" / f"{name}.opt.onnx").read_bytes()
    assert len(onnx.load_from_string(one).graph.initializer) > 0


def test_a_failing_model_is_a_row_and_exit_1(tmp_path, capsys):
    code = main(["optimize-many", str(write_fleet(tmp_path, "out", broken=True)), "--report", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 1
    assert "2/3 models ok" in captured.out and "broken: error" in captured.err
    assert (tmp_path / "out" / "tiny.opt.onnx").exists() and not (tmp_path / "out" / "broken.opt.onnx").exists()
    assert '"status": "error"' in (tmp_path / "r.json").read_text()


def test_bad_manifest_and_missing_ray_exit_2(tmp_path, capsys, monkeypatch):
    assert main(["optimize-many", str(tmp_path / "nope.toml")]) == 2
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    assert main(["optimize-many", str(write_fleet(tmp_path, "out")), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "pip install 'onnxopt[ray]'" in err[-1]
