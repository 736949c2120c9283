"""The analysis cache: a result belongs to the graph it was computed on, and a pass that changed the
graph drops every analysis except those it declares preserved."""

from __future__ import annotations

import dataclasses

import pytest

from onnxopt.framework.context import ANALYSES, PassContext, register_analysis
from onnxopt.framework.manager import PassManager
from onnxopt.framework.pass_api import Pass, PassResult
from onnxopt.ir.graph import import_model
from onnxopt.testing import matmul_add, transposes

#: Calls of the counting analysis, by graph name.
CALLS: list[str] = []


@pytest.fixture(autouse=True)
def _counting_analysis(monkeypatch):
    """An analysis that records each computation (registered for the test only)."""
    monkeypatch.setitem(ANALYSES, "probe", None)
    register_analysis("probe")(lambda graph, ctx: CALLS.append(graph.name) or f"nodes of {graph.name}")
    CALLS.clear()
    yield
    CALLS.clear()


def test_two_graphs_get_two_results():
    ctx = PassContext()
    g1, g2 = import_model(matmul_add()), import_model(transposes())
    assert ctx.analysis("probe", g1) == "nodes of matmul_add"
    assert ctx.analysis("probe", g2) == "nodes of transposes"
    assert ctx.analysis("probe", g1) == "nodes of matmul_add"
    assert CALLS == ["matmul_add", "transposes"]


def test_shapes_are_those_of_the_graph_asked_for():
    ctx = PassContext()
    s1 = ctx.analysis("shapes", import_model(matmul_add()))
    s2 = ctx.analysis("shapes", import_model(transposes()))
    assert s1["y"].shape == (4, 8) and s2["t"].shape == (1, 4, 5, 3)


def test_invalidate_keeps_only_what_is_named():
    ctx = PassContext()
    g = import_model(matmul_add())
    ctx.analysis("probe", g), ctx.analysis("shapes", g)
    ctx.invalidate(keep=("shapes",))
    assert ctx.cached() == ["shapes"]
    ctx.invalidate()
    assert ctx.cached() == []


def _pass(changes: bool, preserves: tuple[str, ...] = ()) -> Pass:
    """A pass that asks for the probe analysis and changes the graph (renames a node) or not."""

    class Probe(Pass):
        name = "probe-pass"

        @dataclasses.dataclass
        class Options:
            pass

        def run(self, graph, ctx):
            ctx.analysis("probe", graph)
            if changes:
                graph.nodes[0].name += "_x"
            return PassResult(changed=changes, reason="" if changes else "asked only")

    Probe.preserves = preserves
    return Probe()


@pytest.mark.parametrize(
    "first,computed",
    [
        (_pass(changes=True), 2),  # a changing pass invalidates: the second pass computes again
        (_pass(changes=True, preserves=("probe",)), 1),  # a preserving pass keeps it
        (_pass(changes=False), 1),  # an unchanged graph keeps every analysis
    ],
)
def test_manager_drops_analyses_after_a_change_unless_preserved(first, computed):
    pm = PassManager([first, _pass(changes=False)], collect_stats=False)
    pm.run(import_model(matmul_add()))
    assert len(CALLS) == computed


def test_unknown_analysis_names_the_known_ones():
    with pytest.raises(KeyError, match="no analysis named 'nope'.*shapes"):
        PassContext().analysis("nope", import_model(matmul_add()))


def test_asking_for_shapes_on_an_unsorted_graph_is_not_a_change():
    # regression: the shapes analysis sorts the graph in place, and the contract's hash saw a change
    # in a pass that only looked
    import onnx

    from onnxopt import Pass, PassResult
    from onnxopt.testing import apply_pass

    class Looks(Pass):
        name = "looks"

        def run(self, graph, ctx):
            ctx.analysis("shapes", graph)
            return PassResult(changed=False, reason="only looks")

    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] z) {
        z = Neg (y)
        y = Relu (x)
    }""")
    out, result = apply_pass(Looks(), m)
    assert not result.changed
