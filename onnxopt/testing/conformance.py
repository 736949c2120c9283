"""Conformance corpus: the ONNX backend test cases, run before and after a pipeline.

The corpus is what the installed `onnx` package carries or can generate:
`node` (generated in memory by `onnx.backend.test`), `simple`,
`pytorch-converted`, `pytorch-operator` (model.onnx + test_data_set_*/*.pb on
disk) and `light` (the light_*.onnx models, fed like onnx's own runner does:
deterministic ramp inputs, expected outputs from light_*_output_0.pb). Each
case onnxruntime (CPU) passes as given is optimized and run again against the
same expected outputs at the case's tolerances (onnx's backend runner
defaults: rtol 1e-3, atol 1e-7, compared by its own `assert_similar_outputs`).
A case that passed before and fails after is a regression.
"""

from __future__ import annotations

import glob
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from onnxopt.api import optimize

KINDS = ("node", "simple", "pytorch-converted", "pytorch-operator", "light")


@dataclass
class Case:
    """One backend test case: a model, its (inputs, expected outputs) data sets and tolerances."""

    name: str
    kind: str
    load: Callable[[], tuple[onnx.ModelProto, list[tuple[list[Any], list[Any]]]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class Outcome:
    """What happened to one case: before/after verdicts, node counts and a message on failure."""

    name: str
    kind: str
    ort_ok: bool
    opt_ok: bool | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    message: str = ""

    @property
    def regression(self) -> bool:
        return self.ort_ok and self.opt_ok is False


@dataclass
class Summary:
    """Counts over a run of the corpus, per kind and in total."""

    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self, kind: str | None = None) -> dict[str, int]:
        rows = [o for o in self.outcomes if kind is None or o.kind == kind]
        ok = [o for o in rows if o.ort_ok]
        return {
            "cases": len(rows),
            "ort_pass": len(ok),
            "opt_pass": sum(bool(o.opt_ok) for o in ok),
            "regressions": sum(o.regression for o in rows),
            "nodes_removed": sum(o.nodes_before - o.nodes_after for o in ok if o.opt_ok is not None),
            "cases_changed": sum(o.nodes_before != o.nodes_after for o in ok if o.opt_ok is not None),
        }

    @property
    def regressions(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.regression]


def _data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def _read_proto(path: str, type_proto: onnx.TypeProto) -> Any:
    """A value from a test .pb file, decoded by the model's declared type (tensor, sequence, optional)."""
    with open(path, "rb") as f:
        content = f.read()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(content)
        return onnx.numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(content)
        return onnx.numpy_helper.to_optional(opt)
    t = onnx.TensorProto()
    t.ParseFromString(content)
    return onnx.numpy_helper.to_array(t)


def _disk_loader(case_dir: Path):
    def load():
        model = onnx.load(str(case_dir / "model.onnx"))
        inputs = _real_inputs(model)
        sets = []
        for d in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
            n_in = len(glob.glob(os.path.join(d, "input_*.pb")))
            n_out = len(glob.glob(os.path.join(d, "output_*.pb")))
            ins = [_read_proto(os.path.join(d, f"input_{i}.pb"), inputs[i].type) for i in range(n_in)]
            outs = [_read_proto(os.path.join(d, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)]
            sets.append((ins, outs))
        return model, sets

    return load


def _light_loader(model_path: Path):
    """Light models: inputs as onnx's runner makes them (a ramp in [0, 1)), outputs from the shipped .pb."""

    def load():
        from onnx.backend.test.runner import Runner  # 1 s to import: only when a case runs

        model = onnx.load(str(model_path))
        ins = [Runner.generate_dummy_data(x, seed=0, random=False) for x in _real_inputs(model)]
        prefix = str(model_path)[: -len(".onnx")]
        outs = [_read_proto(f"{prefix}_output_{i}.pb", o.type) for i, o in enumerate(model.graph.output)]
        return model, [(ins, outs)]

    return load


def _node_loader(tc):
    def load():
        return tc.model, [([_to_array(x) for x in i], [_to_array(x) for x in o]) for i, o in tc.data_sets]

    return load


def _to_array(x: Any) -> Any:
    return onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x


def iter_cases(kinds: Iterable[str] = KINDS) -> Iterator[Case]:
    """Every case of the corpus for the given kinds, in a stable (sorted) order."""
    data = _data_dir()
    for kind in kinds:
        if kind == "node":
            from onnx.backend.test.loader import load_node_model_tests  # 1 s to import: only for `node`

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cases = load_node_model_tests()
            for tc in sorted(cases, key=lambda c: c.name):
                yield Case(tc.name, "node", _node_loader(tc), tc.rtol, tc.atol)
        elif kind == "light":
            for meta in sorted((data / "real").glob("*/data.json")):
                info = json.loads(meta.read_text())
                path = Path(onnx.__file__).parent.parent / info["url"]
                if path.exists():
                    yield Case(
                        f"light_{info['model_name']}",
                        "light",
                        _light_loader(path),
                        info.get("rtol", 1e-3),
                        info.get("atol", 1e-7),
                    )
        else:
            for case_dir in sorted((data / kind).iterdir()):
                if not (case_dir / "model.onnx").exists():
                    continue
                rtol, atol = 1e-3, 1e-7
                if (case_dir / "data.json").exists():
                    info = json.loads((case_dir / "data.json").read_text())
                    rtol, atol = info.get("rtol", rtol), info.get("atol", atol)
                yield Case(case_dir.name, kind, _disk_loader(case_dir), rtol, atol)


def sample_cases(cases: list[Case], n: int, seed: int = 0) -> list[Case]:
    """A fixed, seeded sample of `n` cases (all of them if there are fewer), in corpus order."""
    if n >= len(cases):
        return list(cases)
    keep = set(random.Random(seed).sample(range(len(cases)), n))
    return [c for i, c in enumerate(cases) if i in keep]


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_case(model: onnx.ModelProto, data_sets: list, rtol: float, atol: float) -> str:
    """Run `model` on every data set and compare with onnx's backend-runner check; '' if it passes."""
    from onnx.backend.test.runner import Runner  # 1 s to import: only when a case runs

    try:
        sess = _session(model)
        names = [i.name for i in sess.get_inputs()]
        for ins, outs in data_sets:
            got = sess.run(None, dict(zip(names, ins)))
            Runner.assert_similar_outputs(outs, got, rtol=rtol, atol=atol)
    except Exception as exc:  # noqa: BLE001  harness boundary: any failure of the runtime or the comparison is the case's verdict
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
    return ""


def check_case(case: Case, pipeline: str = "fold,fuse") -> Outcome:
    """Run a case as given; if onnxruntime passes it, optimize with `pipeline` and run it again."""
    t0 = time.perf_counter()
    model, data_sets = case.load()
    out = Outcome(case.name, case.kind, ort_ok=False, nodes_before=len(model.graph.node))
    err = run_case(model, data_sets, case.rtol, case.atol)
    if err:
        out.message = f"as given: {err}"
    else:
        out.ort_ok = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimized = optimize(model, pipeline=pipeline).model
        except Exception as exc:  # noqa: BLE001  harness boundary: the optimizer must handle every model onnxruntime runs
            out.opt_ok = False
            out.message = f"optimize raised {type(exc).__name__}: {str(exc).strip()[:200]}"
        else:
            out.nodes_after = len(optimized.graph.node)
            err = run_case(optimized, data_sets, case.rtol, case.atol)
            out.opt_ok = not err
            out.message = f"after {pipeline}: {err}" if err else ""
    out.seconds = time.perf_counter() - t0
    return out


def run_corpus(
    cases: Iterable[Case], pipeline: str = "fold,fuse", progress: Callable[[Outcome], None] | None = None
) -> Summary:
    """Check every case; `progress` is called with each outcome."""
    summary = Summary()
    for case in cases:
        o = check_case(case, pipeline)
        summary.outcomes.append(o)
        if progress:
            progress(o)
    return summary


def markdown(summary: Summary, pipeline: str = "fold,fuse") -> str:
    """The report: counts per kind and in total, then every regression with its message."""
    head = (
        "| kind | cases | onnxruntime passes | pass after "
        + pipeline
        + " | regressions | cases changed | nodes removed |"
    )
    lines = [head, "|" + "---|" * 7]
    for kind in [k for k in KINDS if any(o.kind == k for o in summary.outcomes)] + [None]:
        c = summary.counts(kind)
        label = kind or "**total**"
        lines.append(
            f"| {label} | {c['cases']} | {c['ort_pass']} | {c['opt_pass']} | {c['regressions']} | "
            f"{c['cases_changed']} | {c['nodes_removed']} |"
        )
    regs = summary.regressions
    lines.append("")
    lines.append(f"Regressions: {len(regs)}")
    for o in regs:
        lines.append(f"- `{o.kind}/{o.name}`: {o.message}")
    return "\n".join(lines)
