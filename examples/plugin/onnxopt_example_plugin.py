"""An example onnxopt plugin: the `name-nodes` pass gives every node a unique, readable name.

Exporters often leave nodes unnamed or with duplicate names, which makes reports,
placement logs and `--exclude` patterns hard to use. Installed with
`pip install -e examples/plugin`; the entry point in its pyproject.toml (group
`onnxopt.passes`) makes `onnxopt passes` list it and `fold,name-nodes` run it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxopt import Pass, PassContext, PassResult, option, register_pass


@register_pass("name-nodes")
class NameNodes(Pass):
    """Name unnamed nodes '<prefix><Op>_<k>' and make duplicate names unique."""

    @dataclass
    class Options:
        prefix: str = option("", "text put before every generated name")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        seen: set[str] = set()
        renamed = 0
        counters: dict[str, int] = {}
        for node in graph.nodes:
            name = node.name
            while not name or name in seen:
                counters[node.op] = counters.get(node.op, 0) + 1
                name = f"{self.options.prefix}{node.op}_{counters[node.op]}"
            if name != node.name:
                node.name = name
                renamed += 1
            seen.add(name)
        return PassResult(
            changed=renamed > 0,
            stats={"renamed": renamed},
            reason="" if renamed else "every node already has a unique name",
        )
