"""Public helpers for testing passes, usable from a plugin's own tests.

    from onnxopt.testing import check_pass_contract, tiny_models

    def test_my_pass_keeps_the_contract():
        for name, model in tiny_models().items():
            check_pass_contract("my-pass", model)

`check_pass_contract` holds a pass to the contract every built-in pass keeps
(valid output, deterministic bytes, honest `changed`, idempotence where declared,
outputs within the pass's tolerance); `apply_pass` runs one pass on a model;
`tiny_models()` and the named builders give small models written in ONNX text;
`model_from_text` parses your own.
"""

from __future__ import annotations

from onnxopt.testing.contract import ContractReport, ContractViolation, apply_pass, check_pass_contract
from onnxopt.testing.models import (
    BUILDERS,
    constant_chain,
    conv_bn_relu,
    if_branches,
    loop_body,
    matmul_add,
    model_from_text,
    nothing_to_do,
    tiny_models,
    transposes,
)

__all__ = [
    "BUILDERS",
    "ContractReport",
    "ContractViolation",
    "apply_pass",
    "check_pass_contract",
    "constant_chain",
    "conv_bn_relu",
    "if_branches",
    "loop_body",
    "matmul_add",
    "model_from_text",
    "nothing_to_do",
    "tiny_models",
    "transposes",
]
