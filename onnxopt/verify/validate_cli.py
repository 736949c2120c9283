"""The options of a validation and the `onnxopt validate` command: argparse in, `validate` run, exit code out.

`optimize --validate` reuses the options with a prefix (`add_validation_options`)
and `validate_from_args`; `finish` prints the table, writes the JSON report and
maps the verdict to the exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxopt.analysis.shapes import parse_input_shapes
from onnxopt.errors import UserError
from onnxopt.runtime.executor import Executor, LocalExecutor, add_executor_arguments, executor_from_args
from onnxopt.verify.tolerance import TOLERANCE_NAMES
from onnxopt.verify.validate import parse_ep_python, parse_eps, validate
from onnxopt.verify.validation_report import ValidationReport


def add_validation_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Options of a validation: data, thresholds, runs, interpreters, report.

    `optimize` adds them with `prefix="validate-"` (`--validate-data`, ...) so
    they cannot clash with its own `--data` or `--report`.
    """
    g = parser.add_argument_group("validation")

    def add(flag: str, **kw) -> None:
        dest = kw.pop("dest", flag.replace("-", "_"))
        g.add_argument(f"--{prefix}{flag}", dest=(prefix + dest).replace("-", "_"), **kw)

    add("data", help="calibration-format inputs: a directory of .npz or one stacked .npz")
    add("samples", type=int, default=8, help="samples to compare (default 8)")
    add("seed", type=int, default=0, help="seed of the random inputs when no data is given")
    add(
        "input-shape",
        action="append",
        metavar="NAME=D0xD1..",
        help="pin a dynamic input shape for random inputs (repeatable)",
    )
    add(
        "tolerance",
        choices=sorted(TOLERANCE_NAMES),
        help="what the passes were allowed to change (default: the class the candidate records in its "
        "metadata, written by optimize; else the pipeline's class; else exact)",
    )
    add("min-cosine", type=float, help="override the pass limit on cosine similarity")
    add("min-sqnr", type=float, dest="min_sqnr_db", help="override the pass limit on SQNR (dB)")
    add("max-abs", type=float, dest="atol", help="a hard limit on the max abs error of the passes")
    add("min-topk", type=float, help="override the pass limit on top-k agreement")
    add("topk", type=int, default=1, help="k of the top-k agreement (default 1)")
    add(
        "topk-outputs",
        metavar="NAME,...",
        type=_names,
        help="outputs judged by top-k agreement along their last axis longer than 1 (default: outputs whose "
        "rows are probabilities, as softmax writes them); '' for none",
    )
    add(
        "allow-missing-ep",
        action="store_true",
        help="an EP asked for that cannot run here does not stop a pass (another EP must be judged)",
    )
    add(
        "require-no-fallback",
        action="store_true",
        help="fail when a node of CAND runs on the CPU EP instead of the target EP",
    )
    add("threads", type=int, default=1, help="intra-op threads of every session (default 1)")
    add("warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    add("runs", type=int, default=10, help="timed runs; latency is their median (default 10)")
    add("timeout", type=float, default=600.0, help="seconds before a worker is killed")
    add(
        "ep-python",
        action="append",
        metavar="EP=PATH",
        help="interpreter that runs an EP's worker (also ONNXOPT_EP_PYTHON_<EP>)",
    )
    add("report", help="write the validation report as JSON here")


def _names(text: str) -> list[str]:
    """`"a,b"` -> `["a", "b"]`; `""` -> `[]`."""
    return [n.strip() for n in text.split(",") if n.strip()]


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `onnxopt validate REF CAND`."""
    parser.add_argument("ref", help="the original model")
    parser.add_argument("cand", help="the optimized model")
    parser.add_argument("--ep", default="cpu", help="comma-separated EPs: cpu,openvino,cuda (default cpu)")
    add_validation_options(parser)
    add_executor_arguments(parser)  # where the accuracy runs go; latency is always measured here


def validate_from_args(
    ref,
    cand,
    eps: list[str],
    args: argparse.Namespace,
    tolerance: str | None = None,
    prefix: str = "",
    executor: Executor | None = None,
) -> ValidationReport:
    """Run `validate` with the options of `add_validation_options(parser, prefix)`.

    The tolerance class is the option's, else the one the candidate records,
    else `tolerance` (for `optimize`, the pipeline's loosest), else exact.
    `executor` runs the accuracy shards; the in-process local executor (the
    CLI default) validates as without one, from this process.
    """
    if isinstance(executor, LocalExecutor) and executor.workers == 1:
        executor = None

    def opt(name: str):
        return getattr(args, (prefix + name).replace("-", "_"))

    limits = dict(
        atol=opt("atol"),
        min_cosine=opt("min_cosine"),
        min_sqnr_db=opt("min_sqnr_db"),
        min_topk=opt("min_topk"),
        topk=opt("topk"),
    )
    report = validate(
        ref,
        cand,
        eps,
        data=opt("data"),
        samples=opt("samples"),
        tolerance=opt("tolerance"),
        limits=limits,
        default_tolerance=tolerance,
        topk_outputs=opt("topk_outputs"),
        allow_missing_ep=opt("allow_missing_ep"),
        require_no_fallback=opt("require_no_fallback"),
        seed=opt("seed"),
        input_shapes=parse_input_shapes(opt("input_shape")),
        threads=opt("threads"),
        warmup=opt("warmup"),
        runs=opt("runs"),
        timeout=opt("timeout"),
        ep_python=parse_ep_python(opt("ep_python")),
        executor=executor,
    )
    if opt("tolerance"):
        report.tolerance_source = f"--{prefix}tolerance"
    return report


def finish(report: ValidationReport, report_path: str | None) -> int:
    """Print the table, write the JSON report if asked, return the exit code.

    0 only when the verdict is PASSED; 1 when it is FAILED or INCONCLUSIVE
    (the original fails too, or an EP asked for did not run).
    """
    print(report.format_table())
    if report_path:
        report.write_json(report_path)
    return 0 if report.passed else 1


def run_validate_command(args: argparse.Namespace) -> int:
    """`onnxopt validate`: 0 when the verdict is PASSED, 1 when FAILED or INCONCLUSIVE (see `finish`)."""
    for path in (args.ref, args.cand):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such model file")
    eps = parse_eps(args.ep)
    with executor_from_args(args) as executor:
        report = validate_from_args(args.ref, args.cand, eps, args, executor=executor)
    return finish(report, args.report)
