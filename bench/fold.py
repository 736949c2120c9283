"""bench/fold: onnxopt `fold,fuse` against onnxsim, onnxslim and onnxruntime's offline basic optimization.

For the 9 `light_*` models, PP-OCR det/rec/cls and the model zoo (magika,
layout_cdla, minilm, the romanizer encoder/decoder, tashkeel): nodes after,
output size, median wall time of several runs, and whether outputs equal the
original (rtol 1e-4, atol 1e-5 on seeded inputs). Every model with dynamic
inputs runs twice: dynamic, and pinned to the shape in `SHAPES` (onnxopt
`--input-shape`, onnxslim `input_shapes`, onnxsim `overwrite_input_shapes`,
onnxruntime on the pinned model). onnxopt runs with its default size limit
(generators above it stay) and with the limit off (complete folding, as
onnxslim does it); the "<= onnxslim" column is the parity goal of issue #14,
compared at the same setting: onnxopt with the limit off, folding everything as
onnxslim does (with the default limit the light models keep their large weight
generators, on purpose). A generated 50,000-node graph measures scaling.

    python bench/fold.py [--runs 3] [--models det,magika,...] [--modes dynamic,pinned] [--out bench/results/fold.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from fixtures.fetch_models import model_path  # noqa: E402
from onnxopt.data.pinning import pin_input_shapes  # noqa: E402
from onnxopt.data.samples import seeded_inputs  # noqa: E402
from onnxopt.data.wheel_models import LIGHT, ZOO  # noqa: E402
from onnxopt.report.tables import human_bytes, table  # noqa: E402
from onnxopt.runtime.sessions import make_session  # noqa: E402

MODELS = LIGHT + ["det", "rec", "cls"] + list(ZOO)
#: the natural static shape of each model's inputs: check inputs in both modes, the pins in pinned mode
SHAPES = {
    "det": {"x": (1, 3, 320, 320)},
    "rec": {"x": (1, 3, 48, 320)},
    "cls": {"x": (1, 3, 48, 192)},
    "magika": {"bytes": (1, 2048)},
    "layout_cdla": {"image": (1, 3, 800, 608)},
    "minilm": {"input_ids": (1, 128), "attention_mask": (1, 128)},
    "romanizer_encoder": {"src": (1, 16), "src_mask": (1, 16)},
    "romanizer_decoder": {"prefix": (1, 8), "memory": (1, 16, 256), "src_mask": (1, 16), "hidden": (1, 2, 256)},
    "tashkeel_bilstm_int8": {"input_ids": (1, 64)},
}
Shapes = dict[str, tuple[int, ...]] | None


def tool_onnxopt(limit: float):
    def run(model: onnx.ModelProto, shapes: Shapes) -> onnx.ModelProto:
        return onnxopt.optimize(model, pipeline=f"fold{{size_limit_mb={limit}}},fuse", input_shapes=shapes).model

    return run


def tool_onnxslim(model: onnx.ModelProto, shapes: Shapes) -> onnx.ModelProto:
    import onnxslim

    pins = [f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()] if shapes else None
    return onnxslim.slim(model, input_shapes=pins)


def tool_onnxsim(model: onnx.ModelProto, shapes: Shapes) -> onnx.ModelProto:
    import onnxsim

    out, ok = onnxsim.simplify(
        model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()} if shapes else None
    )
    if not ok:
        raise RuntimeError("onnxsim check failed")
    return out


def tool_ort_basic(model: onnx.ModelProto, shapes: Shapes) -> onnx.ModelProto:
    import onnxruntime as ort

    pin_input_shapes(model, shapes)
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


TOOLS = {
    "onnxopt (default limit)": tool_onnxopt(1.0),
    "onnxopt (no limit)": tool_onnxopt(0),
    "onnxslim": tool_onnxslim,
    "onnxsim": tool_onnxsim,
    "ort basic": tool_ort_basic,
}


def outputs_equal(ref: onnx.ModelProto, cand: onnx.ModelProto, shapes) -> bool:
    try:
        rs, cs = make_session(ref, optimize=False), make_session(cand, optimize=False)
        for feeds in seeded_inputs(ref, 2, seed=0, input_shapes=shapes):
            for r, c in zip(rs.run(None, feeds), cs.run(None, feeds)):
                if r.shape != c.shape or not np.allclose(c, r, rtol=1e-4, atol=1e-5, equal_nan=True):
                    return False
    except Exception:  # noqa: BLE001  any failure (e.g. the candidate no longer runs with the original's inputs) means not equal
        return False
    return True


def has_dynamic_inputs(model: onnx.ModelProto) -> bool:
    inits = {i.name for i in model.graph.initializer}
    return any(
        not d.HasField("dim_value") or d.dim_value <= 0
        for i in model.graph.input
        if i.name not in inits
        for d in i.type.tensor_type.shape.dim
    )


def bench_model(name: str, runs: int, pinned: bool = False) -> list[dict]:
    """One row per tool; with `pinned`, every tool gets the model's `SHAPES` as static input shapes."""
    path = model_path(name)
    original = onnx.load(str(path))
    shapes = SHAPES.get(name)
    pins = shapes if pinned else None
    label = f"{name} (pinned)" if pinned else name
    rows = []
    for tool, fn in TOOLS.items():
        times, out, err = [], None, ""
        for _ in range(runs):
            m = onnx.ModelProto()
            m.CopyFrom(original)
            t0 = time.perf_counter()
            try:
                out = fn(m, pins)
            except Exception as exc:  # noqa: BLE001  a tool failing on a model is a result, not a crash
                err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
                out = None
                break
            times.append(time.perf_counter() - t0)
        if out is None:
            rows.append({"model": label, "tool": tool, "error": err})
            continue
        size = len(out.SerializeToString()) if out.ByteSize() < 2**31 else out.ByteSize()
        rows.append(
            {
                "model": label,
                "tool": tool,
                "nodes": len(out.graph.node),
                "bytes": size,
                "seconds": statistics.median(times),
                "equal": outputs_equal(original, out, shapes),
            }
        )
        print(
            f"  {label:30s} {tool:24s} nodes={rows[-1]['nodes']:5d} size={human_bytes(size):>9s} "
            f"time={rows[-1]['seconds']:.2f}s equal={rows[-1]['equal']}",
            flush=True,
        )
    rows.insert(
        0,
        {
            "model": label,
            "tool": "original",
            "nodes": len(original.graph.node),
            "bytes": path.stat().st_size,
            "seconds": 0.0,
            "equal": True,
        },
    )
    return rows


def big_graph_timing(n_nodes: int = 50_000) -> dict:
    """fold,fuse over a generated graph of `n_nodes` nodes (chains of Conv/BN/Relu with shape arithmetic)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    k = 0
    while len(nodes) < n_nodes:
        w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{k}")
        s, b = (numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{p}{k}") for p in "sb")
        m, v = (numpy_helper.from_array(np.full(4, val, np.float32), f"{p}{k}") for p, val in (("m", 0.1), ("v", 1.0)))
        inits += [w, s, b, m, v]
        nodes += [
            helper.make_node("Conv", [cur, f"w{k}"], [f"c{k}"]),
            helper.make_node("BatchNormalization", [f"c{k}", f"s{k}", f"b{k}", f"m{k}", f"v{k}"], [f"n{k}"]),
            helper.make_node("Shape", [f"n{k}"], [f"sh{k}"]),
            helper.make_node("Reshape", [f"n{k}", f"sh{k}"], [f"r{k}"]),
            helper.make_node("Identity", [f"r{k}"], [f"i{k}"]),
            helper.make_node("Relu", [f"i{k}"], [f"a{k}"]),
        ]
        cur = f"a{k}"
        k += 1
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    t0 = time.perf_counter()
    out = onnxopt.optimize(model, pipeline="fold,fuse").model
    seconds = time.perf_counter() - t0
    return {
        "nodes_before": len(nodes),
        "nodes_after": len(out.graph.node),
        "seconds": seconds,
        "equal": outputs_equal(model, out, {"x": (2, 4, 8, 8)}),
    }


def render(rows: list[dict], big: dict | None, runs: int) -> str:
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    tools = ["original", *TOOLS]
    head = ["model"] + [f"{t} nodes" for t in tools] + ["no limit <= onnxslim"]
    node_rows, size_rows, time_rows = [], [], []
    totals = {t: 0 for t in tools}
    light_totals = {t: 0 for t in tools}
    for model, res in by_model.items():

        def cell(t, key, fmt, res=res):
            r = res.get(t)
            if r is None or "error" in r:
                return "error" if r else "-"
            mark = "" if r["equal"] else " (differs!)"
            return fmt(r[key]) + mark

        ours, slim = res.get("onnxopt (no limit)", {}), res.get("onnxslim", {})
        parity = (
            "yes"
            if "nodes" in ours and "nodes" in slim and ours["nodes"] <= slim["nodes"]
            else ("-" if "nodes" not in slim else "NO")
        )
        node_rows.append([model] + [cell(t, "nodes", str) for t in tools] + [parity])
        size_rows.append([model] + [cell(t, "bytes", human_bytes) for t in tools])
        time_rows.append([model] + [cell(t, "seconds", lambda s: f"{s:.2f}s") for t in tools[1:]])
        for t in tools:
            if t in res and "error" not in res[t]:
                totals[t] += res[t]["nodes"]
                if model in LIGHT:
                    light_totals[t] += res[t]["nodes"]
    node_rows.append(["**light total**"] + [str(light_totals[t]) for t in tools] + [""])
    parts = [
        f"Median of {runs} runs per tool and model, in one process, on this machine (2 cores). "
        "'(differs!)' marks outputs that do not match the original within rtol 1e-4, atol 1e-5 "
        "(NaN where the original has NaN counts as equal).\n",
        "### Nodes after\n",
        table(head, node_rows),
        "\n### Model size on disk\n",
        table(["model"] + tools, size_rows),
        "\n### Wall time\n",
        table(["model"] + tools[1:], time_rows),
    ]
    if big:
        parts += [
            "\n### Scaling\n",
            table(
                ["graph", "nodes before", "nodes after", "fold,fuse time", "outputs equal"],
                [
                    [
                        "generated Conv/BN/shape chain",
                        big["nodes_before"],
                        big["nodes_after"],
                        f"{big['seconds']:.1f}s",
                        big["equal"],
                    ]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--modes",
        default="dynamic,pinned",
        help="dynamic: inputs as the model declares them; pinned: static SHAPES (models with dynamic inputs only)",
    )
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fold.md")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        print(f"{name} ...", flush=True)
        modes = args.modes.split(",")
        if "dynamic" in modes:
            rows += bench_model(name, args.runs)
        if "pinned" in modes and name in SHAPES and has_dynamic_inputs(onnx.load(str(model_path(name)))):
            rows += bench_model(name, args.runs, pinned=True)
    big = None if args.no_big else big_graph_timing()
    text = render(rows, big, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# bench/fold\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
