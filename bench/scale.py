"""Benchmark: the parallel work of onnxopt on 1 process against 2 Ray workers (a local instance) on this machine.

Three workloads, each run on both executors, each configuration in its own
subprocess (so the driver's peak memory is its own), interleaved over `--runs`:

- calibration: histograms of every Conv input and output of PP-OCR det over
  1,024 rendered pages at 320x320 (`fixtures.ocr_data.det_samples`, seed 0,
  written once as .npz to a temporary directory and read by path);
- sensitivity: the quantize pass's accuracy analysis of PP-OCRv4 rec with the
  executor in its settings (no timing decisions, no statistics cache): its
  calibration on 32 rendered lines sharded on the workers, one trial per
  quantizable layer (output SQNR on 4 samples) run there, then its serial
  search for the layers to keep float under 35 dB;
- optimize-many: `fold,fuse` over PP-OCR det/rec/cls and the 9 light models;
- validation: PP-OCRv4 rec against its `fold,fuse` result on 64 rendered lines
  (`rec_samples`, seed 1) on cpu (+openvino when its environment is set up),
  the accuracy runs sharded on the workers, latency on the driver.

Reported: wall time of the work (Ray's start-up separately), peak RSS of the
driver, of the largest worker and of Ray's own daemons (VmHWM from /proc,
sampled every 0.1 s over the driver's descendants), and whether the results
equal the 1-process run (histograms bit for bit; the pass's per-layer rows,
decisions and model bytes; model bytes of the fleet; validation's per-output metrics and verdict).
Latency is never measured on workers. Writes bench/results/scale.md.

    python bench/scale.py [--samples 1024] [--size 320] [--runs 1] [--val-samples 64]
                          [--only calibration,sensitivity,fleet,validation]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fixtures.fetch_models import model_path  # noqa: E402
from onnxopt.data.wheel_models import LIGHT  # noqa: E402

WORKLOADS = ("calibration", "sensitivity", "fleet", "validation")
CONFIGS = (("1 process", "local", 1), ("2 Ray workers", "ray", 2))


class PeakMemory:
    """Peak RSS (VmHWM) of this process and every descendant, sampled in a thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil

        for p in [self.me] + self.me.children(recursive=True):
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
                name = " ".join(p.cmdline())[:120]
            except (OSError, StopIteration, psutil.Error):
                continue
            self.peaks[p.pid] = (name, max(hwm, self.peaks.get(p.pid, ("", 0))[1]))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict[str, float]:
        """MB: the driver, the largest worker, the number of workers, Ray's daemons together."""
        mb = 1 / 2**20
        driver = self.peaks.get(self.me.pid, ("", 0))[1]
        workers = [
            v
            for pid, (name, v) in self.peaks.items()
            if pid != self.me.pid and ("multiprocessing" in name or name.startswith("ray::"))
        ]
        system = [
            v
            for pid, (name, v) in self.peaks.items()
            if pid != self.me.pid and not ("multiprocessing" in name or name.startswith("ray::"))
        ]
        return {
            "driver_mb": driver * mb,
            "worker_mb": max(workers, default=0) * mb,
            "workers": len(workers),
            "system_mb": sum(system) * mb,
        }


def det_calibration_dir(n: int, size: int) -> Path:
    """1,024 (n) det pages as .npz, generated once into a temporary directory."""
    from fixtures.ocr_data import det_samples, write_calibration_dir

    d = Path(tempfile.gettempdir()) / f"onnxopt-bench-scale-det{size}-{n}"
    if len(list(d.glob("*.npz"))) != n:
        print(f"writing {n} det samples at {size}x{size} to {d} ...", file=sys.stderr)
        write_calibration_dir(det_samples(n, 0, (size, size)), d)
    return d


def _mac_tensors(model, ops=("Conv",)) -> list[str]:
    return sorted({t for n in model.graph.node if n.op_type in ops for t in (n.input[0], n.output[0])})


def child(workload: str, kind: str, workers: int, arg: str, result_path: str) -> None:
    """Run one workload on one executor in this (fresh) process; write timings, memory and results."""
    os.environ.setdefault("ONNXOPT_PROGRESS", "0")
    from onnxopt.runtime.executor import make_executor

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        executor = make_executor(kind, workers)
        if kind == "ray":  # warm the workers so start-up is not counted as work
            executor.map(abs, range(2 * executor.workers))
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        if workload == "calibration":
            from onnxopt.data.sharded_calibration import sharded_observe
            from onnxopt.ir.model_io import load_model

            model = load_model(model_path("det"))
            obs = sharded_observe(model, arg, _mac_tensors(model), executor)
            result = {t: o.to_dict() for t, o in sorted(obs.items())}
        elif workload == "sensitivity":
            import onnxopt
            from fixtures.ocr_data import rec_samples

            t_render = time.perf_counter()
            calib = [{"x": x} for x, _ in rec_samples(32, 0)]
            t0 += time.perf_counter() - t_render  # rendering the data is not the pass's work
            res = onnxopt.optimize(
                model_path("rec"),
                pipeline="quantize{latency_aware=false,check_latency=false,"
                "cache=false,sensitivity_samples=4,target_sqnr=35}",
                calibration=calib,
                settings={"executor": executor},
            )
            rows = next(p for p in res.report["passes"] if p.get("name", p.get("pass")) == "quantize")["details"]
            result = {
                "sqnr": {r["node"]: r["sensitivity_sqnr_db"] for r in rows if "sensitivity_sqnr_db" in r},
                "keep_float_35db": sorted(r["node"] for r in rows if not r["int8"]),
                "model_sha256": hashlib.sha256(res.model.SerializeToString()).hexdigest(),
            }
        elif workload == "validation":
            result, prep = _validation(executor, int(arg))
            t0 += prep  # optimizing rec and rendering the lines is not validation's work
        else:
            from onnxopt.cli.manifest import load_manifest
            from onnxopt.cli.optimize_many import optimize_many

            results = optimize_many(load_manifest(arg), executor)
            result = {
                r.name: (r.status, hashlib.sha256(Path(r.output).read_bytes()).hexdigest() if r.output else r.message)
                for r in results
            }
        work = time.perf_counter() - t0
        executor.close()
    Path(result_path).write_bytes(
        pickle.dumps({"startup_s": startup, "work_s": work, **mem.summary(), "result": result})
    )


def _validation(executor, n: int) -> tuple[dict, float]:
    """Validate rec's fold,fuse result on `n` rendered lines: (per-output metrics, statuses and verdict;
    seconds spent preparing the candidate and the data)."""
    import dataclasses

    import onnxopt
    from fixtures.ocr_data import rec_samples
    from onnxopt.verify.ep.envs import resolve_interpreter
    from onnxopt.verify.validate import validate

    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-validate-") as tmp:
        t0 = time.perf_counter()
        cand = onnxopt.optimize(model_path("rec"), pipeline="fold,fuse").save(Path(tmp) / "rec.opt.onnx")
        data = [{"x": x} for x, _ in rec_samples(n, 1)]
        eps = ["cpu"] + (["openvino"] if resolve_interpreter("openvino").available else [])
        prep = time.perf_counter() - t0
        rep = validate(model_path("rec"), cand, eps, data=data, samples=n, runs=5, warmup=2, executor=executor)
    return {
        "passed": rep.passed,
        "pass": [dataclasses.asdict(c) for c in rep.pass_checks],
        "eps": [(e.ep, e.status, [dataclasses.asdict(c) for c in e.checks]) for e in rep.eps],
    }, prep


def run_child(workload: str, kind: str, workers: int, arg: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        out = f.name
    try:
        subprocess.run(
            [sys.executable, __file__, "--child", workload, kind, str(workers), arg, out], check=True, cwd=ROOT
        )
        return pickle.loads(Path(out).read_bytes())
    finally:
        os.unlink(out)


def write_manifest(path: Path, out_dir: Path) -> Path:
    """The fleet: PP-OCR det/rec/cls and the light models, fold,fuse, outputs into `out_dir`."""
    names = [model_path(n) for n in ("det", "rec", "cls")] + [model_path(n) for n in LIGHT]
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '[defaults]\npipeline = "fold,fuse"\n\n'
        + "\n".join(f'[[model]]\ninput = "{p}"\noutput = "{out_dir / Path(p).name}"\n' for p in names)
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--val-samples", type=int, default=64, help="rendered rec lines of the validation workload")
    ap.add_argument("--only", default=",".join(WORKLOADS))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        workload, kind, workers, arg, out = args.child
        child(workload, kind, int(workers), arg, out)
        return 0
    import platform

    import ray

    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-scale-") as tmp:
        for workload in args.only.split(","):
            measured: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
            for run in range(args.runs):
                for name, kind, workers in CONFIGS:  # interleaved
                    if workload == "calibration":
                        arg = str(det_calibration_dir(args.samples, args.size))
                    elif workload == "validation":
                        arg = str(args.val_samples)
                    elif workload == "fleet":
                        arg = str(write_manifest(Path(tmp) / f"{kind}-{run}.toml", Path(tmp) / f"{kind}-{run}"))
                    else:
                        arg = "-"
                    r = run_child(workload, kind, workers, arg)
                    measured[name].append(r)
                    print(f"{workload:12s} {name:14s} run {run + 1}: {r['work_s']:.1f}s", file=sys.stderr)
            base = measured[CONFIGS[0][0]]
            t_base = statistics.median(r["work_s"] for r in base)
            for name, _, _ in CONFIGS:
                rs = measured[name]
                t = statistics.median(r["work_s"] for r in rs)
                same = all(r["result"] == base[0]["result"] for r in rs)
                checks.append(same)

                def med(k: str, rs: list = rs) -> float:
                    return statistics.median(r[k] for r in rs)

                rows.append(
                    [
                        workload,
                        name,
                        f"{t:.1f}",
                        f"{t_base / t:.2f}x",
                        f"{med('startup_s'):.1f}",
                        f"{med('driver_mb'):.0f}",
                        f"{med('worker_mb'):.0f}" if med("workers") else "-",
                        f"{med('system_mb'):.0f}" if med("system_mb") else "-",
                        "yes" if same else "NO",
                    ]
                )
            detail = base[0]["result"]
            if workload == "sensitivity":
                worst = sorted(detail["sqnr"].items(), key=lambda kv: kv[1])[:3]
                print(
                    f"rec sensitivity: {len(detail['sqnr'])} layers, below 35 dB: {len(detail['keep_float_35db'])},"
                    f" worst {[(k, round(v, 1)) for k, v in worst]}",
                    file=sys.stderr,
                )
    from onnxopt.report.tables import table

    header = [
        "workload",
        "executor",
        "work s",
        "speed-up",
        "start-up s",
        "driver peak MB",
        "worker peak MB",
        "Ray daemons MB",
        "result equal",
    ]
    text = (
        f"# bench/scale: 1 process vs 2 Ray workers\n\n"
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Ray {ray.__version__}; "
        f"runs: {args.runs} (median, interleaved); calibration: {args.samples} PP-OCR det pages "
        f"{args.size}x{args.size}, every Conv input/output, histograms; sensitivity: the quantize pass on "
        f"PP-OCRv4 rec (32-sample calibration, one trial per layer on 4 samples, serial search); "
        f"fleet: fold,fuse on det/rec/cls + 9 light models; validation: rec vs its fold,fuse result on "
        f"{args.val_samples} rendered lines, cpu(+openvino), accuracy on the workers, latency on the driver.\n"
        f"Every task runs onnxruntime with 2 threads (its results depend on the thread count), "
        f"on 1 process or 2 Ray workers.\n\n" + table(header, rows) + "\n"
    )
    print(text)
    out = ROOT / "bench" / "results" / "scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
