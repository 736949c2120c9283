"""Latency decisions under noise: the confidence interval of a ratio (kernels.stats_tests), the
repeated interleaved measurement (runtime.decide) and the passes that decide with it.

The machine is simulated: sessions advance a fake clock by a true duration times seeded noise
(per-run jitter and load bursts that slow whatever runs during them), so the same decisions
must come out as from noise-free timings, and "undecided" where the true ratio is within the noise.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt.kernels.stats_tests import median_rank_bounds, ratio_interval
from onnxopt.runtime import decide
from onnxopt.runtime.timing import TimingCache


class Machine:
    """A fake clock and the noise of a shared machine: each run lasts its true seconds times a
    log-normal jitter, times a load factor that switches between 1 and up to 3x at random."""

    def __init__(self, seed: int, jitter: float = 0.15, bursts: float = 0.05):
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.jitter, self.bursts = jitter, bursts
        self.load = 1.0

    def clock(self) -> float:
        return self.now

    def run(self, seconds: float) -> None:
        if self.rng.random() < self.bursts:  # a neighbour starts or stops
            self.load = 1.0 if self.load > 1.0 else 1.0 + 2.0 * self.rng.random()
        noise = self.rng.lognormal(0.0, self.jitter) if self.jitter else 1.0
        self.now += seconds * noise * self.load

    def runner(self, seconds: float):
        return lambda: self.run(seconds)


def _verdict(true_ratio: float, seed: int | None) -> str:
    m = Machine(seed) if seed is not None else Machine(0, jitter=0.0, bursts=0.0)
    reps = decide.decide_runs([m.runner(1e-3), m.runner(1e-3 * true_ratio)], 6, 18, now=m.clock)
    return reps.comparison().verdict


def test_median_interval_covers_the_median_at_its_confidence():
    assert median_rank_bounds(5) is None  # 1/32 > 2.5%: no 95% interval from five
    assert median_rank_bounds(6) == (0, 5) and median_rank_bounds(12) == (2, 9)
    ratio, low, high = ratio_interval(np.ones(9), np.arange(1, 10, dtype=float))
    assert (ratio, low, high) == (5.0, 2.0, 8.0)
    assert ratio_interval(np.ones(3), np.full(3, 0.5)) == (0.5, 0.0, float("inf"))
    with pytest.raises(ValueError):
        ratio_interval(np.ones(3), np.ones(4))
    rng = np.random.default_rng(0)
    covered = sum(
        low <= 0.8 <= high
        for low, high in (ratio_interval(np.ones(15), 0.8 * rng.lognormal(0, 0.3, 15))[1:] for _ in range(400))
    )
    assert covered / 400 >= 0.95


@pytest.mark.parametrize("true_ratio", [0.5, 0.7, 0.8, 1.25, 1.4, 2.0])
def test_noisy_timings_give_the_noise_free_decisions(true_ratio):
    quiet = _verdict(true_ratio, None)
    assert quiet == ("faster" if true_ratio < 1 else "slower")
    assert [_verdict(true_ratio, seed) for seed in range(10)] == [quiet] * 10


@pytest.mark.parametrize("true_ratio", [1.0, 0.99, 1.01])
def test_a_ratio_within_the_noise_stays_undecided(true_ratio):
    verdicts = [_verdict(true_ratio, seed) for seed in range(20)]
    assert verdicts.count("undecided") >= 18, verdicts


def test_undecided_comparisons_get_more_repetitions_and_clear_ones_stop_early():
    m = Machine(3)
    clear = decide.decide_runs([m.runner(1e-3), m.runner(0.5e-3)], 6, 18, now=m.clock)
    tie = decide.decide_runs([m.runner(1e-3), m.runner(1e-3)], 6, 18, now=m.clock)
    assert len(clear.samples[0]) == 6 and len(tie.samples[0]) == 18


def test_repetitions_alternate_the_order_of_the_sessions():
    order: list[str] = []
    reps = decide.Repetitions([[], []])
    ticks = iter(range(1000))
    decide.repeat([lambda: order.append("a"), lambda: order.append("b")], 2, reps, now=lambda: float(next(ticks)))
    per_block = decide.BLOCK + 1
    assert order == ["a"] * per_block + ["b"] * per_block + ["b"] * per_block + ["a"] * per_block


def test_a_busy_machine_is_reported_once(monkeypatch, caplog):
    monkeypatch.setattr(decide.os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    monkeypatch.setattr(decide, "_busy_warned", [False])
    with caplog.at_level(logging.WARNING, logger=decide.__name__):
        assert decide.machine_busy() and decide.machine_busy()
    assert sum("machine busy" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(decide.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not decide.machine_busy()


# The passes, on the simulated machine: each session's true time comes from what its model holds.

NET = """
<ir_version: 8, opset_import: ["" : 13]>
net (float[1, 16, 12, 12] x) => (float[1, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
    r1 = Relu (c1)
    p = GlobalAveragePool (r1)
    f = Flatten (p)
    m = MatMul (f, M)
    s = Sigmoid (m)
    y = Gemm <transB = 1> (s, G, GB)
}
"""


def _net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(NET)
    shapes = {"W1": (32, 16, 3, 3), "B1": (32,), "M": (32, 48), "G": (10, 48), "GB": (10,)}
    model.graph.initializer.extend(
        numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), k) for k, s in shapes.items()
    )
    return model


class FakeSession:
    """Runs take the true seconds of the model's form on the simulated machine."""

    def __init__(self, model: onnx.ModelProto, machine: Machine, ratios: dict[str, float]):
        ops = [n.op_type for n in model.graph.node]
        quantized = any(op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for op in ops)
        kinds = {k for op in ops for k in ratios if op.startswith(k) or op.endswith(k)}
        layer = kinds.pop() if len(kinds) == 1 else "model"  # one layer's model, or the whole one
        self.seconds = 1e-3 * (ratios[layer] if quantized else 1.0)
        self.machine = machine

    def run(self, outputs, feeds):
        self.machine.run(self.seconds)


def _decisions(monkeypatch, tmp_path, machine: Machine, ratios: dict[str, float], tag: str) -> dict[str, bool]:
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / tag))
    monkeypatch.setattr(decide, "clock", machine.clock)
    monkeypatch.setattr(decide, "make_session", lambda m, threads=2: FakeSession(m, machine, ratios))
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, 16, 12, 12)).astype(np.float32)} for _ in range(4)]
    res = onnxopt.optimize(_net(), pipeline="quantize{accuracy_aware=false}", calibration=data)
    rep = next(p for p in res.report["passes"] if p.get("name", p.get("pass")) == "quantize")
    return {r["op"]: bool(r["int8"]) for r in rep["details"]}


@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_decides_the_same_layers_on_a_noisy_machine(monkeypatch, tmp_path, seed):
    ratios = {"Conv": 0.6, "MatMul": 1.5, "Gemm": 0.7, "model": 0.8}
    quiet = _decisions(monkeypatch, tmp_path, Machine(0, jitter=0.0, bursts=0.0), ratios, "quiet")
    assert quiet == {"Conv": True, "MatMul": False, "Gemm": True}
    assert _decisions(monkeypatch, tmp_path, Machine(seed), ratios, f"noisy{seed}") == quiet


def test_quantize_keeps_float_where_int8_is_within_the_noise(monkeypatch, tmp_path):
    ratios = {"Conv": 0.98, "MatMul": 1.5, "Gemm": 0.6, "model": 0.8}
    got = _decisions(monkeypatch, tmp_path, Machine(4), ratios, "tie")
    assert got == {"Conv": False, "MatMul": False, "Gemm": True}


def test_timing_cache_keeps_the_interval_and_reads_plain_medians_as_exact(tmp_path):
    cache = TimingCache("test", path=tmp_path / "t.json")
    cache.put("plain", [2.0, 1.0])
    assert cache.compare("plain", [onnx.ModelProto()] * 2, {}).verdict == "faster"
    cache.put("noisy", [2.0, 1.9, 0.96, 0.8, 1.1])
    c = cache.compare("noisy", [onnx.ModelProto()] * 2, {})
    assert c.verdict == "undecided" and (c.ratio, c.low, c.high) == (0.96, 0.8, 1.1)
    assert TimingCache("test", path=tmp_path / "t.json").measure("noisy", [onnx.ModelProto()] * 2, {}) == [2.0, 1.9]
