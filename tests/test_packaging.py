"""pyproject's explicit package list names every package of the source tree (with `package-dir`
setuptools cannot discover them, and an editable install hides a missing one: a wheel would
lack it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_packages() -> set[str]:
    found = set()
    for folder, prefix in (("onnxopt", "onnxopt"), ("passes", "onnxopt.passes"), ("kernels", "onnxopt.kernels")):
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((prefix, *init.parent.relative_to(ROOT / folder).parts)))
    return found


def test_every_package_is_listed() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M)
    assert block, "no packages list in [tool.setuptools]"
    listed = set(re.findall(r'"([^"]+)"', block.group(1)))
    assert _tree_packages() - listed == set()
    assert listed - _tree_packages() == set()
