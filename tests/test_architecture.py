"""The architecture, checked: layering, import cycles, module sizes, complexity.

The design (docs/architecture.md) says: `kernels` imports numpy/scipy and nothing of ours;
the core (`onnxopt/*`) never imports a particular pass; there are no import cycles, also not
hidden inside functions; no core module is over 400 lines; no function reaches cyclomatic
complexity grade D (radon). These tests read the source (every import statement, wherever
it is, except under `if TYPE_CHECKING:`), so a violation fails CI before it ships.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest
from radon.complexity import cc_visit
from radon.visitors import Class

ROOT = Path(__file__).resolve().parents[1]
#: Source folders and the package each installs as (pyproject's package-dir).
SOURCES = {"onnxopt": ROOT / "onnxopt", "onnxopt.passes": ROOT / "passes", "onnxopt.kernels": ROOT / "kernels"}
CORE_MAX_LINES = 400
#: The layers, top to bottom: a module may import its own layer and the layers below it, never
#: one above. A module belongs to the first entry its name starts with.
LAYERS = [
    ("onnxopt.cli", "onnxopt.__main__"),  # the command line
    ("onnxopt.api", "onnxopt.testing", "onnxopt.rewrite"),  # public entry points and toolkits
    ("onnxopt.passes",),  # particular passes, registered by import
    ("onnxopt.verify",),  # tolerances, --check, validate, the save gate, accuracy guard
    ("onnxopt.framework",),  # the Pass contract, context, registry, pipeline text, manager
    ("onnxopt.data",),  # calibration samples and statistics, pinned input shapes
    ("onnxopt.analysis",),  # shapes and statistics of a graph
    ("onnxopt.runtime",),  # onnxruntime sessions, timing, executors
    ("onnxopt.ir",),  # model files, graph helpers, op table, weight staging
    ("onnxopt.report",),  # formatting: tables, JSON, progress bars
    ("onnxopt.errors", "onnxopt.paths"),
    ("onnxopt.kernels",),  # numbers only
]


def _module_files() -> dict[str, Path]:
    """{module name: file} for every module of the installed package."""
    out = {}
    for pkg, folder in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _module_files()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> set[str]:
    """The modules of ours that `module` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> None:
        # `from a.b import c` names module a.b.c when that is a module, else a.b
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("onnxopt"):
                        resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                if base.startswith("onnxopt"):
                    for a in child.names:
                        resolve(f"{base}.{a.name}")
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> nx.DiGraph:
    """Module -> module edges for every import of ours."""
    g = nx.DiGraph()
    for mod, path in MODULES.items():
        g.add_node(mod)
        for dep in _imports(mod, path):
            g.add_edge(mod, dep)
    return g


GRAPH = import_graph()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _core(module: str) -> bool:
    return not (_in(module, "onnxopt.passes") or _in(module, "onnxopt.kernels"))


def test_the_map_sees_every_layer():
    assert {"onnxopt.framework.manager", "onnxopt.kernels.quant", "onnxopt.passes.fold"} <= set(MODULES)
    assert GRAPH.number_of_edges() > 50


def layer_of(module: str) -> int | None:
    """Index of `module`'s layer in LAYERS (None for the package's own __init__)."""
    for i, prefixes in enumerate(LAYERS):
        if any(_in(module, p) for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "onnxopt" and layer_of(m) is None] == []


def test_no_module_imports_a_layer_above_its_own():
    up = []
    for a, b in GRAPH.edges:
        la, lb = layer_of(a), layer_of(b)
        if la is not None and lb is not None and lb < la:
            up.append(f"{a} -> {b}")
    assert not up, "imports against the layering (docs/architecture.md):\n" + "\n".join(sorted(up))


def test_kernels_import_nothing_of_ours():
    bad = [(a, b) for a, b in GRAPH.edges if _in(a, "onnxopt.kernels") and not _in(b, "onnxopt.kernels")]
    assert not bad, f"kernels must stay free of graph code: {bad}"


def test_core_imports_no_pass():
    bad = [(a, b) for a, b in GRAPH.edges if _core(a) and _in(b, "onnxopt.passes")]
    assert not bad, f"the core must not import a particular pass (passes register themselves): {bad}"


def test_passes_do_not_import_each_other():
    def pass_of(m: str) -> str:
        return ".".join(m.split(".")[:3])

    bad = [
        (a, b)
        for a, b in GRAPH.edges
        if _in(a, "onnxopt.passes") and _in(b, "onnxopt.passes") and pass_of(a) != pass_of(b)
    ]
    assert not bad, f"a pass uses another pass's internals (move the shared part to the core): {bad}"


def test_no_import_cycles():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(GRAPH) if len(c) > 1)
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _core(m)))
def test_core_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= CORE_MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines (at most {CORE_MAX_LINES})"


def test_no_function_of_complexity_grade_d_or_worse():
    bad = []
    for path in MODULES.values():
        blocks = cc_visit(path.read_text())
        functions = {(m.lineno, m.fullname): m for b in blocks for m in (b.methods if isinstance(b, Class) else [b])}
        for block in functions.values():
            if block.complexity > 20:
                bad.append(f"{path.relative_to(ROOT)}:{block.lineno} {block.fullname} {block.complexity}")
    assert not bad, "split these functions (radon grade D or worse):\n" + "\n".join(bad)
