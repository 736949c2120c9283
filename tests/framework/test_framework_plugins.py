"""An exception raised inside a third-party pass is reported as that plugin's, naming the plugin's
distribution or module and the pass; onnxopt's own passes' errors stay ours."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import UserError
from onnxopt.framework import registry
from onnxopt.framework.attribution import PluginPassError
from onnxopt.framework.manager import PassManager
from onnxopt.framework.pass_api import Pass
from onnxopt.ir.graph import import_model
from onnxopt.testing import nothing_to_do


class _Crashes(Pass):
    """A third-party pass with a bug."""

    name = "crashes"

    @dataclasses.dataclass
    class Options:
        pass

    def run(self, graph, ctx):
        return {}["missing"]


class _WrongResult(_Crashes):
    name = "wrong-result"

    def run(self, graph, ctx):
        return None


class _RefusesInput(_Crashes):
    name = "refuses"

    def run(self, graph, ctx):
        raise UserError("pass 'refuses': this model has no Conv")


@pytest.fixture
def plugin(monkeypatch):
    """Register the test passes as if they came from a distribution 'acme-passes'."""
    registry.load_passes()
    for cls in (_Crashes, _WrongResult, _RefusesInput):
        monkeypatch.setitem(registry._PASSES, cls.name, cls)
        monkeypatch.setitem(registry.PASS_ORIGINS, cls.name, "acme-passes")


def test_a_plugin_crash_names_the_plugin_module_pass_and_line(plugin):
    with pytest.raises(PluginPassError) as err:
        onnxopt.optimize(nothing_to_do(), pipeline="crashes")
    msg = str(err.value)
    assert "pass 'crashes' of plugin 'acme-passes'" in msg and f"module {__name__}" in msg
    assert "KeyError: 'missing'" in msg and "test_framework_plugins.py:" in msg and "in run" in msg
    assert isinstance(err.value.__cause__, KeyError) and err.value.origin == "acme-passes"


def test_a_wrong_result_type_is_the_plugins_too(plugin):
    with pytest.raises(PluginPassError, match="returned NoneType, expected PassResult"):
        onnxopt.optimize(nothing_to_do(), pipeline="wrong-result")


def test_a_user_error_from_a_plugin_stays_a_user_error(plugin):
    with pytest.raises(UserError, match="this model has no Conv") as err:
        onnxopt.optimize(nothing_to_do(), pipeline="refuses")
    assert not isinstance(err.value, PluginPassError)


def test_an_unregistered_pass_outside_onnxopt_is_attributed_to_its_module():
    with pytest.raises(PluginPassError, match=f"of a pass outside onnxopt \\(module {__name__}"):
        PassManager([_Crashes()], collect_stats=False).run(import_model(nothing_to_do()))


def test_a_builtin_pass_error_stays_onnxopts(monkeypatch):
    fold = registry.get_pass("fold")
    monkeypatch.setattr(fold, "run", lambda self, graph, ctx: {}["bug"])
    with pytest.raises(KeyError):
        PassManager([fold()], collect_stats=False).run(import_model(nothing_to_do()))


def test_cli_reports_the_plugin_not_an_internal_error(plugin, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(nothing_to_do(), src)
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", "crashes"])
    err = capsys.readouterr().err
    assert code == 3 and "internal error" not in err and "plugin 'acme-passes'" in err
    assert "onnxopt: plugin error:" in err and "reproducer saved in" in err
    assert not (tmp_path / "o.onnx").exists()
