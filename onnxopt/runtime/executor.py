"""Where embarrassingly parallel work runs: in this process, a local process pool, or a Ray cluster.

One interface (`Executor.map(fn, items)` and `Executor.share(obj)`), three
places to run. `fn` must be a module-level function (it is pickled by
reference) and `items` small: large inputs (a model, calibration samples) are
shared once with `share()` (a temporary file for the process pool, Ray's object
store with `ray.put` for Ray) and each task reads them with `Shared.get()`,
which caches the object per worker process; models on a shared filesystem
travel as paths. A worker that dies mid-task (a crash, the OOM killer, a lost
node) is restarted and its task retried, up to `retries` times, so a map's
result is the same as without the failure. One progress bar counts the tasks
as they finish, whatever runs them.

Latency is never measured through an executor: timing belongs on the machine
that will serve the model (`onnxopt.timing` runs on the driver), and a random
worker's numbers mean nothing for the deployment target.

Ray is optional (`pip install onnxopt[ray]`) and imported only when asked for.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from onnxopt.errors import UserError
from onnxopt.report.progress import progress

T = TypeVar("T")
R = TypeVar("R")

KINDS = ("local", "ray")
#: Objects shared with `share()` kept per worker process (least recently used are dropped).
_SHARED_CACHE_SIZE = 4
_shared_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()


class WorkerLost(RuntimeError):
    """A task's worker died more often than the retry budget allows."""


class Shared:
    """A handle to an object put once where every worker can read it; `get()` inside a task.

    Pickling the handle carries only its key and where the object lies (a file
    path or a Ray object reference), never the object itself.
    """

    def __init__(self, key: str, value: Any = None, path: str | None = None, ref: Any = None):
        self.key, self.path, self.ref = key, path, ref
        self._value = value
        self._local = path is None and ref is None

    def __getstate__(self) -> dict[str, Any]:
        if self._local:
            raise TypeError("an in-process Shared handle cannot leave its process")
        return {"key": self.key, "path": self.path, "ref": self.ref}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _value=None, _local=False)

    def get(self) -> Any:
        """The shared object (loaded once per process, then cached)."""
        if self._local:
            return self._value
        if self.key in _shared_cache:
            _shared_cache.move_to_end(self.key)
            return _shared_cache[self.key]
        if self.ref is not None:
            import ray  # optional dependency: only a Ray executor makes a `ref`

            value = ray.get(self.ref)
        else:
            assert self.path is not None, "a handle that is neither local nor a Ray ref lies in a file"
            with open(self.path, "rb") as f:
                value = pickle.load(f)
        _shared_cache[self.key] = value
        while len(_shared_cache) > _SHARED_CACHE_SIZE:
            _shared_cache.popitem(last=False)
        return value


class Executor:
    """Runs `fn(item)` for many items somewhere and returns the results in item order."""

    kind: str = "local"
    #: How many tasks run at once.
    workers: int = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T], desc: str = "tasks", unit: str = "task") -> list[R]:
        """`[fn(x) for x in items]`, run in parallel, with one progress bar; a task's exception is raised."""
        items = list(items)
        results: list[Any] = [None] * len(items)
        for index, value in progress(self._completions(fn, items), desc, total=len(items), unit=unit):
            results[index] = value
        return results

    def share(self, obj: Any) -> Shared:
        """Put `obj` once where every worker can read it (pass the handle in the items)."""
        return Shared(uuid.uuid4().hex, value=obj)

    def close(self) -> None:
        """Release workers and shared objects."""

    def describe(self) -> str:
        """One line for logs and reports."""
        return f"{self.kind} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def _completions(self, fn: Callable, items: Sequence) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            before = os.environ.get("ONNXOPT_PROGRESS")
            os.environ["ONNXOPT_PROGRESS"] = "0"  # the map's bar is the only one
            try:
                value = fn(item)
            finally:
                if before is None:
                    del os.environ["ONNXOPT_PROGRESS"]
                else:
                    os.environ["ONNXOPT_PROGRESS"] = before
            yield i, value

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """This machine: in-process when `workers` is 1, else a pool of `workers` spawned processes.

    The pool uses the `spawn` start method (forking a process that already runs
    onnxruntime thread pools can deadlock). When a worker dies the pool is
    rebuilt and every unfinished task resubmitted; a task is given up (and
    `WorkerLost` raised) after `retries` such restarts while it was running.
    """

    def __init__(self, workers: int = 1, retries: int = 3):
        self.workers = max(1, int(workers))
        self.retries = retries
        self._pool: cf.ProcessPoolExecutor | None = None
        self._tmp: Path | None = None
        #: Pool restarts after a worker died (for reports and tests).
        self.restarts = 0

    def share(self, obj: Any) -> Shared:
        if self.workers == 1:
            return super().share(obj)
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="onnxopt-shared-"))
        key = uuid.uuid4().hex
        path = self._tmp / f"{key}.pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        return Shared(key, path=str(path))

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker
        )

    def _completions(self, fn: Callable, items: Sequence) -> Iterator[tuple[int, Any]]:
        if self.workers == 1:
            yield from super()._completions(fn, items)
            return
        attempts = [0] * len(items)
        todo = list(range(len(items)))
        while todo:
            if self._pool is None:
                self._pool = self._new_pool()
            futures = {self._pool.submit(fn, items[i]): i for i in todo}
            broken: list[int] = []
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    value = fut.result()
                except BrokenProcessPool:
                    broken.append(i)
                    continue
                except BaseException:
                    self._discard_pool()
                    raise
                yield i, value
            if broken:
                self._discard_pool()
                self.restarts += 1
                for i in broken:
                    attempts[i] += 1
                    if attempts[i] > self.retries:
                        raise WorkerLost(f"task {i} ({items[i]!r:.80}): its worker died {attempts[i]} times")
            todo = sorted(broken)

    def _discard_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        self._discard_pool()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _quiet_worker() -> None:
    """Pool worker start-up: no progress bars of its own (the driver's map shows one)."""
    os.environ["ONNXOPT_PROGRESS"] = "0"


def _import_ray():
    try:
        import ray  # optional dependency, imported only for --executor ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'onnxopt[ray]' (or pip install 'ray>=2.40')") from None
    return ray


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def ray_init_local(num_cpus: int | None = None) -> None:
    """Start a local Ray instance whose workers import what this process can (its sys.path)."""
    ray = _import_ray()
    path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "ONNXOPT_PROGRESS": "0"}},
    )


class RayExecutor(Executor):
    """A Ray cluster: `address` (or $RAY_ADDRESS) of an existing one, else a local instance of `workers` CPUs.

    Each task asks for one CPU and runs onnxruntime on one thread. A task whose
    worker process dies is retried by Ray (`max_retries`); an exception raised
    by the task itself is not retried and is re-raised here. If Ray was already
    initialized by the caller, that session is used and left running.
    """

    kind = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = 3):
        ray = _import_ray()
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"ONNXOPT_PROGRESS": "0"}})
                else:
                    ray_init_local(workers)
            except ConnectionError as exc:
                raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
            self._owns = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_call)

    def share(self, obj: Any) -> Shared:
        return Shared(uuid.uuid4().hex, ref=self._ray.put(obj))

    def _completions(self, fn: Callable, items: Sequence) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        fn_ref = ray.put(fn)
        refs = {self._remote.remote(fn_ref, item): i for i, item in enumerate(items)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    for other in pending:
                        ray.cancel(other)
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else exc) from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
                    raise WorkerLost(f"task {refs[ref]}: {exc}") from None
                yield refs[ref], value

    def describe(self) -> str:
        return f"ray ({self.workers} CPUs)"

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


def make_executor(kind: str = "local", workers: int = 1, address: str | None = None, retries: int = 3) -> Executor:
    """An executor by name: 'local' (in-process for 1 worker, else a process pool) or 'ray'."""
    if kind == "local":
        return LocalExecutor(workers, retries)
    if kind == "ray":
        return RayExecutor(address, workers if workers > 1 else None, retries)
    raise UserError(f"unknown executor '{kind}': use one of {', '.join(KINDS)}")


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """`--executor local|ray`, `--workers N`, `--ray-address ADDR`."""
    g = parser.add_argument_group("parallel execution")
    g.add_argument(
        "--executor",
        choices=KINDS,
        default="local",
        help="where the parallel work runs: local (this machine; default) or ray (a Ray cluster)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="local: processes (1 = in this process); ray: CPUs of a local instance started when no "
        "cluster address is given (default: all)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="address of an existing Ray cluster, e.g. ray://head:10001 or auto (default $RAY_ADDRESS; "
        "without either a local instance is started)",
    )


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor named by `add_executor_arguments`' options."""
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.ray_address and args.executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    return make_executor(args.executor, args.workers, args.ray_address)
