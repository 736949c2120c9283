"""`onnxopt cache list|clear`: every kind of on-disk cache listed with its size, cleared by kind;
the environments and crash reproducers only when named."""

from __future__ import annotations

import argparse

import pytest

from onnxopt.cli import cache
from onnxopt.errors import UserError
from onnxopt.runtime.timing import TimingCache


@pytest.fixture
def homes(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    TimingCache("quantize").put("layer", [1.0, 2.0])
    (tmp_path / "cache" / "calib-abc.json").write_text("x" * 2048)
    env = tmp_path / "home" / "envs" / "openvino" / "bin"
    env.mkdir(parents=True)
    (env / "python").write_text("y" * 100)
    (tmp_path / "home" / "crashes" / "20260101-000000-a").mkdir(parents=True)
    return tmp_path


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cache.add_parser(parser.add_subparsers())
    args = parser.parse_args(["cache", *argv])
    return args.func(args)


def _listed(capsys) -> dict[str, str]:
    assert _run("list") == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}


def test_list_shows_every_kind_with_entries_and_size(homes, capsys):
    rows = _listed(capsys)
    assert set(rows) == {"timing", "calibration", "crashes", "envs"}
    assert " 1 entries" in rows["timing"] and str(homes / "cache") in rows["timing"]
    assert "2.0 KiB" in rows["calibration"] and "100 B" in rows["envs"]
    assert _run("list", "timing", "-v") == 0
    assert "timing-quantize-" in capsys.readouterr().out


def test_clear_removes_the_rebuilt_kinds_and_keeps_environments(homes, capsys):
    assert _run("clear") == 0
    rows = _listed(capsys)
    assert " 0 entries" in rows["timing"] and " 0 entries" in rows["calibration"]
    assert " 1 entries" in rows["envs"] and " 1 entries" in rows["crashes"]
    assert TimingCache("quantize").get("layer") is None
    assert _run("clear", "envs") == 0
    assert " 0 entries" in _listed(capsys)["envs"]
    assert not (homes / "home" / "envs" / "openvino").exists()


def test_clear_one_kind_only(homes, capsys):
    assert _run("clear", "calibration") == 0
    rows = _listed(capsys)
    assert " 0 entries" in rows["calibration"] and " 1 entries" in rows["timing"]


def test_an_unknown_kind_is_a_user_error(homes):
    with pytest.raises(UserError, match="unknown cache kind bogus"):
        _run("clear", "bogus")
