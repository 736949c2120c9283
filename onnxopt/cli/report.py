"""`onnxopt report R.json -o R.html`: turn a JSON report (optimize's, or diff's) into a self-contained page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxopt.cli.logs import add_logging_options
from onnxopt.errors import UserError
from onnxopt.report.html import write_html

EPILOG = """\
examples:
  onnxopt optimize m.onnx -o q.onnx -p fold,quantize --calib calib/ --report r.json
  onnxopt report r.json -o r.html
  onnxopt diff m.onnx q.onnx --report d.json && onnxopt report r.json --diff d.json -o r.html
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `report` and its options."""
    p = sub.add_parser(
        "report",
        help="write a JSON report as one self-contained HTML page with charts",
        description="Render R.json (from 'optimize --report' or 'diff --report') as HTML: the before/after "
        "summary, every pass's stats, per-layer charts and tables, validation per EP, and a diff's error by depth. "
        "No network is needed to open it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("json", metavar="R.json", help="a JSON report of optimize or diff")
    p.add_argument("-o", "--output", required=True, metavar="R.html", help="where to write the page")
    p.add_argument("--diff", metavar="D.json", help="also plot this diff result ('onnxopt diff --report')")
    add_logging_options(p, quiet_help="print only errors")
    p.set_defaults(func=run)


def read_report(path: str) -> dict:
    """A JSON report as a dict, or a `UserError` saying why it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{p}: not a JSON report ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: not a JSON report (expected an object)")
    return data


def run(args: argparse.Namespace) -> int:
    """Read, render, write."""
    if Path(args.output).resolve() in {Path(args.json).resolve(), Path(args.diff or args.json).resolve()}:
        raise UserError(f"-o {args.output}: is an input of the command; choose another path")
    report = read_report(args.json)
    diff = read_report(args.diff) if args.diff else None
    out = write_html(report, args.output, diff)
    if not args.quiet:
        print(f"wrote {out}")
    return 0
