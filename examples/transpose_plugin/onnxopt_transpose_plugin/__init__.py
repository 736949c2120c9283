"""An example onnxopt plugin with a real rewrite: `cancel-transpose` removes a Transpose followed by
its inverse Transpose, in the main graph and inside If/Loop/Scan bodies.

Installed with `pip install -e examples/transpose_plugin`; the entry point in its
pyproject.toml (group `onnxopt.passes`) imports this package, which registers the pass,
so `onnxopt passes` lists it and `-p fold,cancel-transpose` runs it. It uses only the
public API: `onnxopt` (Pass, PassResult, option, register_pass) and `onnxopt.rewrite`;
its tests use `onnxopt.testing`.
"""

from __future__ import annotations

from onnxopt_transpose_plugin.cancel import CancelTranspose, composes_to_identity

__all__ = ["CancelTranspose", "composes_to_identity"]
