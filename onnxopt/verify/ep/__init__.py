"""Execution providers: managed environments, the worker that runs a model, and its runner.

`onnxruntime`, `onnxruntime-openvino` and `onnxruntime-gpu` are builds of the
same Python module and cannot share an environment, so each EP runs in a worker
process started from the interpreter of an environment that has its build
(`envs`), driven through files (`runner`, `worker`).
"""

from __future__ import annotations

from onnxopt.errors import UserError

EP_PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
"""Short EP names accepted on the command line -> ONNX Runtime provider names."""


def provider_name(ep: str) -> str:
    """The ONNX Runtime provider name for a short EP name (`openvino` -> `OpenVINOExecutionProvider`)."""
    try:
        return EP_PROVIDERS[ep.lower()]
    except KeyError:
        known = ", ".join(EP_PROVIDERS)
        raise UserError(f"unknown execution provider {ep!r}; use one of: {known}") from None
