"""`onnxopt optimize IN -o OUT`: run a pipeline of passes over a model and save the result."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnxopt.analysis.shapes import parse_input_shapes
from onnxopt.api import Result, optimize
from onnxopt.cli.errors import EXIT_CHECK, EXIT_OK
from onnxopt.cli.logs import add_logging_options
from onnxopt.cli.pass_summaries import add_summaries
from onnxopt.data.samples import parse_input_values
from onnxopt.errors import UserError
from onnxopt.framework.context import TARGETS
from onnxopt.framework.pass_api import Pass
from onnxopt.framework.pipeline import DEFAULT_PIPELINE, build_pipeline
from onnxopt.ir.model_io import check_data_beside, check_output_path, data_file_of
from onnxopt.report import json_report
from onnxopt.report.html import write_html
from onnxopt.report.tables import format_report
from onnxopt.runtime.executor import Executor, add_executor_arguments, executor_from_args
from onnxopt.verify.tolerance import loosest
from onnxopt.verify.validate import parse_eps
from onnxopt.verify.validate_cli import add_validation_options, finish, validate_from_args

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  onnxopt optimize m.onnx -o m.opt.onnx --check 3
  onnxopt optimize rec.onnx -o q.onnx -p fold,quantize --calib calib/
  onnxopt optimize m.onnx -o l.onnx -p 'fold,lowrank{params=0.3}' --calib calib/
  onnxopt optimize m.onnx -o q.onnx -p fold,quantize --calib calib/ --validate cpu,openvino
  onnxopt optimize m.onnx -o m.opt.onnx --input-shape x=1x3x224x224 --report r.json -v
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `optimize` and its options."""
    p = sub.add_parser(
        "optimize",
        help="run a pipeline of passes over a model and save the result",
        description="Load IN, run the pipeline, save OUT atomically (the input is never "
        "modified), print a before/after report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("input", metavar="IN", help="the .onnx model to optimize")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the optimized model")
    p.add_argument(
        "-p",
        "--pipeline",
        default=DEFAULT_PIPELINE,
        help=f"passes to run, e.g. 'fold,fuse,quantize{{method=entropy}}' (default {DEFAULT_PIPELINE}; "
        "'simplify' = fold,fuse; see 'onnxopt passes')",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="cpu",
        help="the runtime the model is for: cpu and cuda (onnxruntime: com.microsoft fused operators "
        "allowed), openvino (standard operators only); fusions and quantization follow it (default cpu)",
    )
    p.add_argument("--calib", metavar="PATH", help="calibration data for quantize/prune/lowrank")
    p.add_argument("--report", metavar="R.json", help="write the full report as JSON (R.html: as a page with charts)")
    p.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="compare original and result on the CPU EP with N inputs (calibration samples if given, "
        "else seeded random); exit 1 if they differ beyond the passes' tolerance",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0xD1..",
        help="rewrite the input to this static shape before the passes run, so shape-dependent "
        "arithmetic folds (also NAME:D0,D1,...; repeatable); also used for MACs and check inputs",
    )
    p.add_argument(
        "--input-value",
        action="append",
        metavar="NAME=VALUE",
        help="fix an input of the generated --check data, e.g. a sample rate: sr=16000 "
        "(a scalar, or a comma list V1,V2,...; repeatable)",
    )
    p.add_argument("--dump-dir", metavar="DIR", help="save the model after every pass into DIR")
    p.add_argument(
        "--verify-each",
        action="store_true",
        help="run onnx.checker and load in onnxruntime after every pass (catches the pass at fault)",
    )
    p.add_argument("--external-data", action="store_true", help="save weights to OUT.data (automatic above 2 GB)")
    p.add_argument(
        "--validate", metavar="EPS", help="validate the result right after optimizing on these EPs, e.g. cpu,openvino"
    )
    add_logging_options(p, quiet_help="print only errors")
    add_validation_options(p, prefix="validate-")
    add_executor_arguments(p)  # where quantize's calibration/sensitivity and --validate's accuracy shards run
    p.set_defaults(func=run)


def _check_output_paths(args: argparse.Namespace) -> None:
    """Before any work: OUT (and its data file, and --report) may be written and overwrite no input."""
    check_output_path(args.output, (args.input,))
    if args.external_data:
        check_data_beside(args.output)
    if args.report:
        out_files = {Path(args.output).resolve(), data_file_of(args.output)}
        if Path(args.report).resolve() in out_files:
            raise UserError(f"--report {args.report}: is the output model (or its data file); choose another path")
        check_output_path(args.report, (args.input,))


def run(args: argparse.Namespace) -> int:
    """Optimize, save, optionally validate; 0 ok, 1 when --check or --validate failed."""
    _check_output_paths(args)
    input_values = parse_input_values(args.input_value)
    passes = build_pipeline(args.pipeline)  # bad pass names/options fail before the model is read
    eps = parse_eps(args.validate) if args.validate else None
    src = Path(args.input)
    with executor_from_args(args) as executor:
        log.info("optimizing %s with pipeline %s", src, args.pipeline)
        result = optimize(
            src,
            pipeline=args.pipeline,
            calibration=args.calib,
            check=args.check,
            input_shapes=parse_input_shapes(args.input_shape),
            dump_dir=args.dump_dir,
            verify_each=args.verify_each,
            settings={"executor": executor},
            input_values=input_values,
            target=args.target,
        )
        _log_passes(result)
        check = result.report.get("check")
        if check is not None and not check["ok"]:
            return _check_failed(args, result, check)
        result.save(args.output, external_data=args.external_data or None)
        log.info("wrote %s", args.output)
        code = _validate(args, result, passes, eps, executor) if eps else EXIT_OK
        summaries = add_summaries(result.report)
        if args.report:
            write = write_html if args.report.endswith((".html", ".htm")) else json_report.write_json
            write(result.report, args.report)
        if not args.quiet:
            print(format_report(result.report))
            print("\n" + "\n".join(summaries))
            print(f"\nwrote {args.output} in {result.report['seconds']:.1f}s")
        return code


def _log_passes(result: Result) -> None:
    """One INFO line per pass run (its time and whether it changed the graph); its stats at DEBUG."""
    for record in result.report["passes"]:
        log.info(
            "pass %s: %s in %.2fs", record["name"], "changed" if record["changed"] else "no change", record["seconds"]
        )
        log.debug("pass %s stats: %s", record["name"], record["stats"])


def _check_failed(args: argparse.Namespace, result: Result, check: dict) -> int:
    """--check found a difference: report it (and write the JSON report), write no model, exit 1."""
    if args.report:
        json_report.write_json(result.report, args.report)
    print(format_report(result.report), file=sys.stderr)
    print(f"check failed: {check['message']} (nothing written to {args.output})", file=sys.stderr)
    return EXIT_CHECK


def _validate(args: argparse.Namespace, result: Result, passes: list[Pass], eps: list[str], executor: Executor) -> int:
    """--validate: compare the written model with its input on `eps`; the verdict joins the report."""
    rep = validate_from_args(
        str(Path(args.input)),
        args.output,
        eps,
        args,
        tolerance=loosest([p.tolerance for p in passes]),
        prefix="validate-",
        executor=executor,
    )
    result.report["validation"] = rep.to_dict() if hasattr(rep, "to_dict") else None
    return finish(rep, args.validate_report)
