"""`onnxopt ep setup|list|remove`: the environments that run the OpenVINO and CUDA EPs.

The work is `onnxopt.verify.ep.envs`'s; this module only registers the command.
"""

from __future__ import annotations

import argparse

from onnxopt.cli.logs import add_logging_options
from onnxopt.verify.ep import envs

EPILOG = """\
examples:
  onnxopt ep list                      # which interpreter runs each EP, or why none can
  onnxopt ep setup openvino            # a managed venv with onnxruntime-openvino
  onnxopt ep setup openvino --package onnxruntime-openvino==1.24.1 --force
  onnxopt ep remove openvino
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `ep` and its own subcommands."""
    e = sub.add_parser(
        "ep",
        help="set up / list / remove the environments of the OpenVINO and CUDA EPs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    envs.add_ep_arguments(e)
    add_logging_options(e)
    e.set_defaults(func=envs.run_ep_command)
