"""`onnxopt diff REF CAND`: compare two models tensor by tensor and name the layer (and pass) at fault."""

from __future__ import annotations

import argparse

from onnxopt.analysis.shapes import parse_input_shapes
from onnxopt.cli.errors import EXIT_CHECK, EXIT_OK
from onnxopt.cli.logs import add_logging_options
from onnxopt.errors import UserError
from onnxopt.report.json_report import to_json, write_json
from onnxopt.verify.diff import DiffOptions, diff_models
from onnxopt.verify.tolerance import TOLERANCE_NAMES

EPILOG = """\
examples:
  onnxopt diff m.onnx q.onnx --data calib/                 # which layer loses the accuracy
  onnxopt diff m.onnx q.onnx --data calib/ --ep openvino   # the candidate on OpenVINO
  onnxopt diff m.onnx q.onnx --dump-dir dumps/             # and which pass (from optimize --dump-dir)
  onnxopt diff m.onnx q.onnx --json > diff.json            # for scripts, and for 'onnxopt report --diff'

exit codes: 0 no tensor diverges beyond the limits, 1 one does, 2 bad input
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `diff` and its options."""
    p = sub.add_parser(
        "diff",
        help="compare two models tensor by tensor: the first divergence and each layer's own error",
        description="Match the tensors of REF and CAND (same names; a quantized tensor's DequantizeLinear output "
        "stands for it), run both over the data a chunk of tensors at a time, and report per tensor its error, "
        "the first tensor beyond the limits, and each layer's own error (the layer fed REF's values).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("ref", metavar="REF", help="the reference model (the original)")
    p.add_argument("cand", metavar="CAND", help="the candidate model (optimized from REF)")
    p.add_argument("--data", metavar="PATH", help="samples: a directory of .npz or one .npz (default: seeded random)")
    p.add_argument("--samples", type=int, default=4, metavar="N", help="samples to run (default 4)")
    p.add_argument("--ep", choices=("cpu", "openvino"), default="cpu", help="where CAND runs (REF: CPU EP)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="layers listed by own error (default 10)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of text")
    p.add_argument("--report", metavar="R.json", help="also write the full result as JSON")
    p.add_argument("--chunk", type=int, default=32, metavar="N", help="tensors compared per run (default 32)")
    p.add_argument("--tolerance", choices=TOLERANCE_NAMES, help="limits (default: the class CAND records)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples (default 0)")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0xD1..", help="shape of generated samples")
    p.add_argument("--dump-dir", metavar="DIR", help="CAND's 'optimize --dump-dir': name the pass at fault")
    add_logging_options(p, quiet_help="print only errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Diff, print, exit 1 when a tensor diverges beyond the limits."""
    if args.samples < 1 or args.top < 0:
        raise UserError("--samples must be at least 1 and --top at least 0")
    opts = DiffOptions(
        data=args.data,
        samples=args.samples,
        ep=args.ep,
        chunk=args.chunk,
        tolerance=args.tolerance,
        seed=args.seed,
        input_shapes=parse_input_shapes(args.input_shape),
        dump_dir=args.dump_dir,
    )
    report = diff_models(args.ref, args.cand, opts)
    if args.report:
        write_json(report.to_dict(), args.report)
    if args.json:
        print(to_json(report.to_dict()))
    elif not args.quiet:
        print(report.format_text(args.top))
    diverged = report.first_divergence is not None or bool(report.bisect and report.bisect.get("pass"))
    return EXIT_CHECK if diverged else EXIT_OK
