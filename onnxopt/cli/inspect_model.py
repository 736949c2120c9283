"""`onnxopt inspect MODEL`: a model's signature, op counts, parameters and MACs.

(Named `inspect_model` so it cannot be mistaken for the standard library's `inspect`.)
"""

from __future__ import annotations

import argparse

import onnx

from onnxopt.analysis.shapes import numpy_dtype, parse_input_shapes
from onnxopt.analysis.stats import ModelStats, model_stats
from onnxopt.cli.errors import EXIT_OK
from onnxopt.cli.logs import add_logging_options
from onnxopt.data.pinning import check_pinnable
from onnxopt.data.samples import value_kind
from onnxopt.ir.model_io import load_model
from onnxopt.report.json_report import to_json
from onnxopt.report.tables import human_bytes, human_count, table

EPILOG = """\
examples:
  onnxopt inspect model.onnx
  onnxopt inspect model.onnx --input-shape x=1x3x224x224     # MACs at a pinned shape
  onnxopt inspect model.onnx --json | jq .ops
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `inspect` and its options."""
    p = sub.add_parser(
        "inspect",
        help="show a model's inputs, outputs, ops, parameters and MACs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("model", help="the .onnx model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0xD1..", help="pin dynamic axes for MACs")
    add_logging_options(p)
    p.set_defaults(func=run)


def describe_value(vi: onnx.ValueInfoProto) -> dict:
    """Kind (tensor, sequence, optional...), element type and shape of a graph input or output."""
    kind, tt = value_kind(vi.type)
    if tt is None:
        return {"kind": kind, "dtype": None, "shape": None}
    try:
        dtype = str(numpy_dtype(tt.elem_type)) if tt.elem_type else "?"
    except (KeyError, TypeError, ValueError):  # an element type numpy has no name for: ONNX's name
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
    shape = (
        [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if tt.HasField("shape")
        else None
    )
    return {"kind": kind, "dtype": dtype, "shape": shape}


def value_text(v: dict) -> str:
    """`float32 [1, 3, 'h', 'w']`, or `sequence<float32 [...]>` for a non-tensor value."""
    inner = (
        v["kind"]
        if v["dtype"] is None
        else f"{v['dtype']} {v['shape'] if v['shape'] is not None else '(rank unknown)'}"
    )
    return inner if v["kind"] == "tensor" or v["dtype"] is None else f"{v['kind']}<{inner}>"


def run(args: argparse.Namespace) -> int:
    """Print a model's signature (tensor, sequence and optional values), op counts, size and MACs.

    Counts cover the bodies of If/Loop/Scan nodes too; the main graph's own node
    count is shown beside the total.
    """
    model = load_model(args.model)
    pins = parse_input_shapes(args.input_shape)
    if pins:
        check_pinnable(model, pins)  # unknown names and wrong ranks are errors, never ignored
    stats = model_stats(model, pins)
    inits = {i.name for i in model.graph.initializer}
    inputs = {vi.name: describe_value(vi) for vi in model.graph.input if vi.name not in inits}
    outputs = {vi.name: describe_value(vi) for vi in model.graph.output}
    info = {
        "path": args.model,
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": inputs,
        "outputs": outputs,
        "metadata": {p.key: p.value[:80] for p in model.metadata_props},
        **stats.to_dict(),
    }
    print(to_json(info) if args.json else _text(info, stats))
    return EXIT_OK


def _text(info: dict, stats: ModelStats) -> str:
    """The terminal form of `inspect`: signature, sizes, then the op counts, most frequent first."""
    lines = [f"{info['path']}: IR {info['ir_version']}, opsets {info['opsets']}"]
    lines += [f"  input  {k}: {value_text(v)}" for k, v in info["inputs"].items()]
    lines += [f"  output {k}: {value_text(v)}" for k, v in info["outputs"].items()]
    lines.append(f"  {_size_line(stats)}")
    lines.append(table(["op", "count"], sorted(stats.ops.items(), key=lambda kv: (-kv[1], kv[0]))))
    return "\n".join(lines)


def _size_line(stats: ModelStats) -> str:
    """Nodes (main graph vs control-flow bodies), parameters, weight bytes and MACs, with what was not counted."""
    inside = stats.nodes - stats.main_graph_nodes
    nodes = (
        f"{stats.nodes} nodes ({stats.main_graph_nodes} in the main graph, {inside} in If/Loop/Scan bodies)"
        if inside
        else f"{stats.nodes} nodes"
    )
    notes = [f"{stats.macs_uncounted} MAC layers not counted (shapes unknown)"] if stats.macs_uncounted else []
    if stats.loops_counted_once:
        notes.append(f"{stats.loops_counted_once} Loop bodies counted once (trip count not a constant)")
    return (
        f"{nodes}, {human_count(stats.parameters)} parameters ({human_bytes(stats.weight_bytes)}), "
        f"{human_count(stats.macs)} MACs at {dict(stats.input_shapes)}" + "".join(f"; {n}" for n in notes)
    )
