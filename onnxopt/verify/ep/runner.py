"""Start the EP worker in a subprocess and turn whatever happens into a `WorkerResult`.

A worker that crashes, is killed or hangs past its timeout gives a failed
result carrying the reason and the tail of its stderr; nothing here raises
for a worker's failure, so one bad backend never takes the tool down.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("worker.py")
STDERR_TAIL = 2000


@dataclass
class WorkerJob:
    """One model on one provider: what the worker request file holds, minus the file paths."""

    model: str
    provider: str
    provider_options: dict = field(default_factory=dict)
    graph_optimization_level: str = "all"
    intra_op_threads: int = 1
    warmup: int = 0
    runs: int = 0
    record_placement: bool = False
    placement_method: str = "auto"
    want_outputs: bool = True


@dataclass
class WorkerResult:
    """What came back from a worker: status ok|error|unavailable, outputs per sample, placement, latency."""

    status: str
    error: str = ""
    stage: str = ""
    ort_version: str = ""
    providers_available: list[str] = field(default_factory=list)
    providers_used: list[str] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    placement: dict | None = None
    latency_ms: list[float] = field(default_factory=list)
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def write_inputs(path: Path, samples: list[dict[str, np.ndarray]], names: list[str]) -> None:
    """Store samples in the worker's .npz layout: key `s<sample>_<input index>`."""
    arrays = {f"s{i}_{j}": np.asarray(s[name]) for i, s in enumerate(samples) for j, name in enumerate(names)}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # savez's stub types **kwds beside allow_pickle: bool


def run_worker(
    python: str,
    job: WorkerJob,
    inputs_npz: Path,
    input_names: list[str],
    samples: int,
    timeout: float = 600.0,
    on_start: Callable[[subprocess.Popen], None] | None = None,
    env: dict[str, str] | None = None,
) -> WorkerResult:
    """Run `job` with interpreter `python` on the inputs already stored in `inputs_npz`.

    `on_start` receives the process right after it starts (tests use it to kill the worker);
    `env` replaces the inherited environment of the worker process.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-job-") as tmp:
        tmpdir = Path(tmp)
        request = {
            "model": str(job.model),
            "provider": job.provider,
            "provider_options": job.provider_options,
            "graph_optimization_level": job.graph_optimization_level,
            "intra_op_threads": job.intra_op_threads,
            "warmup": job.warmup,
            "runs": job.runs,
            "record_placement": job.record_placement,
            "placement_method": job.placement_method,
            "inputs": str(inputs_npz),
            "input_names": input_names,
            "samples": samples,
            "outputs": str(tmpdir / "outputs.npz") if job.want_outputs else None,
            "result": str(tmpdir / "result.json"),
        }
        (tmpdir / "request.json").write_text(json.dumps(request))
        stderr_path = tmpdir / "stderr.txt"
        with open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, str(WORKER), str(tmpdir / "request.json")], stdout=subprocess.DEVNULL, stderr=err, env=env
                )
            except OSError as exc:
                return WorkerResult("error", f"cannot start worker with {python}: {exc}", "start")
            if on_start:
                on_start(proc)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return WorkerResult(
                    "error",
                    f"worker timed out after {timeout:g} s and was killed",
                    "timeout",
                    stderr_tail=_tail(stderr_path),
                )
        return _collect(tmpdir, request, code, _tail(stderr_path))


def _collect(tmpdir: Path, request: dict, code: int, stderr_tail: str) -> WorkerResult:
    """Read the worker's result JSON and outputs, or explain why there are none."""
    result_path = Path(request["result"])
    if not result_path.is_file():
        if code < 0:
            try:
                why = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                why = f"killed by signal {-code}"
        else:
            why = f"exited with code {code}"
        return WorkerResult("error", f"worker {why} before writing a result", "crash", stderr_tail=stderr_tail)
    raw = json.loads(result_path.read_text())
    res = WorkerResult(
        raw["status"],
        raw.get("error", ""),
        raw.get("stage", ""),
        raw.get("ort_version", ""),
        raw.get("providers_available", []),
        raw.get("providers_used", []),
        [],
        raw.get("placement"),
        raw.get("latency_ms", []),
        stderr_tail,
    )
    if res.ok and request["outputs"]:
        names = raw["output_names"]
        with np.load(request["outputs"], allow_pickle=False) as z:
            res.outputs = [{name: z[f"s{i}_{k}"] for k, name in enumerate(names)} for i in range(request["samples"])]
    return res


def _tail(path: Path) -> str:
    data = path.read_bytes()[-STDERR_TAIL:]
    return data.decode("utf-8", errors="replace").strip()
