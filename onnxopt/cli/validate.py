"""`onnxopt validate REF CAND`: compare a candidate with its original on the CPU/OpenVINO/CUDA EPs.

The work is `onnxopt.verify.validate`'s (its options: `onnxopt.verify.validate_cli`);
this module only registers the command.
"""

from __future__ import annotations

import argparse

from onnxopt.cli.logs import add_logging_options
from onnxopt.verify.validate_cli import add_validate_arguments, run_validate_command

DESCRIPTION = """\
Run REF and CAND on each EP: outputs compared per output (max/mean abs error,
cosine, SQNR, top-k), node placement read back from onnxruntime, latency."""

EPILOG = """\
examples:
  onnxopt validate m.onnx m.opt.onnx                                  # CPU EP, seeded random inputs
  onnxopt validate m.onnx q.onnx --ep cpu,openvino --data calib/
  onnxopt validate m.onnx q.onnx --ep openvino --min-cosine 0.999 --require-no-fallback --report v.json
Exit 0 when the verdict is PASSED, 1 when FAILED or INCONCLUSIVE, 2 for bad input.
EPs other than cpu run in managed environments: see 'onnxopt ep setup --help'.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `validate` (its options come from `onnxopt.verify.validate`)."""
    v = sub.add_parser(
        "validate",
        help="compare a candidate with its original on CPU/OpenVINO/CUDA EPs",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    add_validate_arguments(v)
    add_logging_options(v)
    v.set_defaults(func=run_validate_command)
