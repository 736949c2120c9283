"""Run one ONNX model on one execution provider and write its outputs, placement and latency.

A standalone script: it is started by file path from the interpreter of an EP's
own environment (where `onnxruntime-openvino` or `onnxruntime-gpu` replaces
`onnxruntime`), so it imports only numpy, onnxruntime and the standard library.

    python worker.py REQUEST.json

The request (JSON) names: `model`, `provider`, `provider_options`,
`graph_optimization_level` (disable|basic|extended|all), `intra_op_threads`,
`inputs` (.npz with keys `s<sample>_<input index>`), `input_names`, `samples`,
`outputs` (.npz to write with keys `s<sample>_<output index>`, or null),
`warmup`, `runs`, `record_placement`, `placement_method` (auto|profiling;
auto uses the partitioner's record where this onnxruntime has it) and
`result` (the JSON to write). The
result has `ok`, `status` (ok|error|unavailable), `error`, `stage`,
`ort_version`, `providers_available`, `providers_used`, `output_names`,
`placement` and `latency_ms`; it is written even on error, and the exit code
is 0 only when `ok`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CPU = "CPUExecutionProvider"


class Unavailable(RuntimeError):
    """The requested provider is missing or the session silently fell back to another."""


def use_assignment_info(req: dict) -> bool:
    """Whether placement comes from the partitioner's record rather than a profiling trace."""
    return req.get("placement_method", "auto") == "auto" and hasattr(
        ort.InferenceSession, "get_provider_graph_assignment_info"
    )


def session_options(req: dict, profile_dir: str | None) -> ort.SessionOptions:
    """Session options with fixed threads, the requested optimization level and placement recording."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[req.get("graph_optimization_level", "all")]
    so.intra_op_num_threads = int(req.get("intra_op_threads", 1))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = int(req.get("log_severity_level", 3))
    if req.get("record_placement"):
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if profile_dir and not use_assignment_info(req):
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "profile")
    return so


def create_session(req: dict, profile_dir: str | None) -> ort.InferenceSession:
    """Open the model on the provider (with the CPU EP behind it) and check the provider was kept."""
    provider = req["provider"]
    available = ort.get_available_providers()
    if provider not in available:
        raise Unavailable(f"{provider} is not in this onnxruntime {ort.__version__} ({', '.join(available)})")
    providers: list[str | tuple[str, dict[str, str]]] = [
        (provider, {k: str(v) for k, v in req.get("provider_options", {}).items()})
    ]
    if provider != CPU:
        providers.append(CPU)
    sess = ort.InferenceSession(req["model"], session_options(req, profile_dir), providers=providers)
    if provider not in sess.get_providers():
        raise Unavailable(
            f"{provider} could not be initialised; the session fell back to "
            f"{', '.join(sess.get_providers())} (see the worker's stderr)"
        )
    return sess


def placement_from_assignment(sess: ort.InferenceSession) -> dict:
    """Node placement as recorded by onnxruntime's graph partitioner (ORT >= 1.23)."""
    nodes, subgraphs = [], []
    for sub in sess.get_provider_graph_assignment_info():
        members = list(sub.get_nodes())
        subgraphs.append({"ep": sub.ep_name, "nodes": len(members)})
        nodes += [{"name": n.name, "op_type": n.op_type, "ep": sub.ep_name} for n in members]
    return {"method": "assignment_info", "nodes": nodes, "subgraphs": subgraphs}


def placement_from_profile(path: str) -> dict:
    """Node placement from a profiling trace: each node event carries `args.provider`.

    A subgraph that an EP compiled (OpenVINO, TensorRT) shows as one fused node,
    so its members are not listed; nodes left to the CPU EP are, by name.
    """
    with open(path) as f:
        events = json.load(f)
    seen: dict[str, dict] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") != "Node" or "provider" not in args:
            continue
        name = ev["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
        seen.setdefault(name, {"name": name, "op_type": args.get("op_name", ""), "ep": args["provider"]})
    nodes = list(seen.values())
    fused = [n for n in nodes if n["ep"] != CPU and "subgraph" in n["op_type"].lower()]
    subgraphs = [{"ep": n["ep"], "nodes": None, "name": n["name"]} for n in fused]
    subgraphs += [{"ep": n["ep"], "nodes": 1} for n in nodes if n not in fused]
    return {"method": "profiling", "nodes": [n for n in nodes if n not in fused], "subgraphs": subgraphs}


def load_feeds(req: dict) -> list[dict[str, np.ndarray]]:
    """The input samples, keyed by input name."""
    names = req["input_names"]
    with np.load(req["inputs"], allow_pickle=False) as z:
        return [{name: z[f"s{i}_{j}"] for j, name in enumerate(names)} for i in range(int(req["samples"]))]


def run(req: dict, result: dict) -> None:
    """Do the work of one request, filling `result` as it goes."""
    result["stage"] = "inputs"
    feeds = load_feeds(req)
    with tempfile.TemporaryDirectory(prefix="onnxopt-worker-") as tmp:
        result["stage"] = "session"
        sess = create_session(req, tmp)
        result["providers_used"] = sess.get_providers()
        output_names = [o.name for o in sess.get_outputs()]
        result["output_names"] = output_names
        if req.get("record_placement") and use_assignment_info(req):
            result["placement"] = placement_from_assignment(sess)
        result["stage"] = "run"
        outputs = {}
        for i, feed in enumerate(feeds):
            for k, value in enumerate(sess.run(output_names, feed)):
                outputs[f"s{i}_{k}"] = np.asarray(value)
        if sess.get_session_options().enable_profiling:
            result["placement"] = placement_from_profile(sess.end_profiling())
        if req.get("outputs"):
            np.savez(req["outputs"], **outputs)  # type: ignore[arg-type]  # savez's stub types **kwds beside allow_pickle: bool
        result["stage"] = "timing"
        feed = feeds[0] if feeds else {}
        for _ in range(int(req.get("warmup", 0))):
            sess.run(output_names, feed)
        for _ in range(int(req.get("runs", 0))):
            start = time.perf_counter()
            sess.run(output_names, feed)
            result["latency_ms"].append((time.perf_counter() - start) * 1e3)
    result.update(ok=True, status="ok", stage="done")


def main(argv: list[str]) -> int:
    """Read the request named on the command line, run it, write the result JSON."""
    with open(argv[1]) as f:
        req = json.load(f)
    result = {
        "ok": False,
        "status": "error",
        "error": "",
        "stage": "start",
        "ort_version": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "providers_used": [],
        "output_names": [],
        "placement": None,
        "latency_ms": [],
    }
    try:
        run(req, result)
    except Unavailable as exc:
        result.update(status="unavailable", error=str(exc))
    except Exception as exc:  # noqa: BLE001  worker boundary: every failure becomes a result the caller reports
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    tmp = req["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, req["result"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
