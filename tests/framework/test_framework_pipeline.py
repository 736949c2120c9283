"""Pipeline text is checked whole before any pass runs: names, options, `choices`, `Literal` and
`Enum` values of every pass."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import UserError
from onnxopt.framework import registry
from onnxopt.framework.options import option, options_dict
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.framework.pipeline import build_pipeline
from onnxopt.testing import nothing_to_do


class Mode(enum.Enum):
    FAST = "fast"
    CAREFUL = "careful"


class _Choosy(Pass):
    """Options of every kind with a fixed set of values."""

    name = "choosy"

    @dataclasses.dataclass
    class Options:
        mode: Mode = option(Mode.FAST, "an Enum option")
        side: Literal["left", "right"] = option("left", "a Literal option")
        sides: list[Literal["left", "right"]] = option(["left"], "a list of Literal values")
        level: str | None = option(None, "choices= on a str", choices=("low", "high"))

    def run(self, graph, ctx):
        return PassResult(changed=False, reason="only options")


@pytest.fixture
def choosy(monkeypatch):
    registry.load_passes()
    monkeypatch.setitem(registry._PASSES, "choosy", _Choosy)
    monkeypatch.setitem(registry.PASS_ORIGINS, "choosy", "tests")


def test_enum_and_literal_values_parse(choosy):
    (p,) = build_pipeline("choosy{mode=careful,side=right,sides=left|right,level=high}")
    assert p.options.mode is Mode.CAREFUL and p.options.side == "right" and p.options.sides == ["left", "right"]
    (p,) = build_pipeline("choosy{mode=CAREFUL}")  # an Enum member by name too
    assert p.options.mode is Mode.CAREFUL
    assert options_dict(p.options)["mode"] == "careful"  # the report shows the value


@pytest.mark.parametrize(
    "text,words",
    [
        ("choosy{mode=slow}", "'mode' = 'slow' is not allowed (allowed: one of fast, careful)"),
        ("choosy{side=up}", "'side' = 'up' is not allowed (allowed: one of left, right)"),
        ("choosy{sides=left|up}", "'sides' = 'up' is not allowed (allowed: one of left, right)"),
        ("choosy{level=mid}", "'level' = 'mid' is not allowed (allowed: one of low, high)"),
    ],
)
def test_a_value_outside_the_set_fails_at_parse_time(choosy, text, words):
    with pytest.raises(UserError) as err:
        build_pipeline("fold," + text)
    assert words in str(err.value)


def test_options_built_from_python_are_checked_against_literal_and_enum(choosy):
    with pytest.raises(UserError, match="'side' = 'up' is not allowed"):
        _Choosy(_Choosy.Options(side="up"))
    with pytest.raises(UserError, match="'mode' = 'x' is not allowed"):
        _Choosy(_Choosy.Options(mode="x"))


def test_option_docs_show_the_allowed_values():
    docs = {name: kind for name, kind, _, _ in _Choosy.option_docs()}
    assert [default for _, _, default, _ in _Choosy.option_docs()] == ["fast", "left", ["left"], None]
    assert docs == {"mode": "fast|careful", "side": "left|right", "sides": "list[left|right]", "level": "low|high|None"}


def test_a_bogus_choice_stops_the_run_before_any_pass_runs(monkeypatch):
    ran: list[str] = []
    fold = registry.get_pass("fold")
    monkeypatch.setattr(fold, "run", lambda self, graph, ctx: ran.append("fold"))
    with pytest.raises(UserError, match="'criterion' = 'bogus' is not allowed"):
        onnxopt.optimize(nothing_to_do(), pipeline="fold,prune{criterion=bogus}")
    assert ran == []


def test_cli_exits_2_on_a_bogus_choice_before_fold_runs(tmp_path, monkeypatch, capsys):
    import onnx

    ran: list[str] = []
    monkeypatch.setattr(registry.get_pass("fold"), "run", lambda self, graph, ctx: ran.append("fold"))
    src = tmp_path / "m.onnx"
    onnx.save(nothing_to_do(), src)
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", "fold,prune{criterion=bogus}"])
    assert code == 2 and ran == [] and "criterion" in capsys.readouterr().err
