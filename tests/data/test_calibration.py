"""Calibration: streamed, mergeable statistics in flat memory, varying shapes, the disk cache, range methods."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxopt.data import calibration
from onnxopt.data.calibration import activation_histograms, observe
from onnxopt.kernels.observers import HistogramObserver
from onnxopt.kernels.ranges import range_entropy, range_minmax, range_mse, range_percentile

NET = """
<ir_version: 8, opset_import: ["" : 13]>
net (float[1, 4, 16, W] x) => (float[1, 4, 16, W] y) {
    a = Mul (x, k)
    y = Relu (a)
}
"""


def _model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(NET)
    model.graph.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "k"))
    return model


def _samples(n: int, widths=(64,), seed: int = 0, heavy: bool = False):
    """A generator (samples are never all in memory at once)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (1, 4, 16, widths[i % len(widths)])
        x = rng.standard_t(2, shape) if heavy else rng.standard_normal(shape)
        yield {"x": x.astype(np.float32)}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ONNXOPT_PROGRESS", "0")


def _observe_peak(n: int) -> int:
    tracemalloc.start()
    obs = observe(_model(), _samples(n, widths=(256,)), ["a", "y"], lambda t: HistogramObserver(max_bins=2048))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(o.counts.size <= 2048 for o in obs.values())
    assert obs["a"].count == n * 4 * 16 * 256
    return peak


def test_streamed_statistics_keep_memory_flat():
    """Eight times the samples, about the same peak: observers are bounded and samples are dropped."""
    small, large = _observe_peak(6), _observe_peak(48)
    assert large < 1.5 * small + 256 * 1024


def test_input_widths_may_vary_and_statistics_are_exact():
    data = list(_samples(7, widths=(24, 40, 64, 100)))
    obs = observe(_model(), data, ["a"], lambda t: HistogramObserver())["a"]
    values = np.concatenate([2 * s["x"].ravel() for s in data])
    assert obs.count == values.size
    assert obs.min == pytest.approx(float(values.min())) and obs.max == pytest.approx(float(values.max()))


def test_shards_merge_into_the_same_statistics_as_one_pass():
    data = list(_samples(6, widths=(32, 48)))
    whole = observe(_model(), data, ["y"], lambda t: HistogramObserver())["y"]
    left = observe(_model(), data[:2], ["y"], lambda t: HistogramObserver())["y"]
    right = observe(_model(), data[2:], ["y"], lambda t: HistogramObserver())["y"]
    assert left.merge(right) == whole


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = calibration.observe

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "observe", counted)
    return calls


def test_disk_cache_hit_does_not_run_the_model_again(monkeypatch):
    calls = _counting(monkeypatch)
    data = list(_samples(4, widths=(32, 48)))
    first = activation_histograms(_model(), data, ["a", "y"])
    assert len(calls) == 1
    second = activation_histograms(_model(), data, ["a", "y"])
    assert len(calls) == 1, "a warm cache must not run the model"
    assert all(first[t] == second[t] for t in ("a", "y"))
    activation_histograms(_model(), data, ["a"], cache=False)
    assert len(calls) == 2


def test_cache_is_invalidated_when_data_or_model_change(monkeypatch):
    calls = _counting(monkeypatch)
    data = list(_samples(4, widths=(32,)))
    before = activation_histograms(_model(), data, ["a"])
    data[2] = {"x": data[2]["x"] * 3}
    after = activation_histograms(_model(), data, ["a"])
    assert len(calls) == 2 and after["a"].max > before["a"].max
    other = _model()
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(5.0, np.float32), "k"))
    activation_histograms(other, data, ["a"])
    assert len(calls) == 3


def test_range_methods_differ_on_heavy_tailed_data():
    hist = activation_histograms(_model(), list(_samples(8, heavy=True)), ["a"], cache=False)["a"]
    lo, hi = range_minmax(hist)
    widths = {"minmax": hi - lo}
    for name, (a, b) in {
        "percentile": range_percentile(hist, 99.9),
        "entropy": range_entropy(hist, symmetric=False),
        "mse": range_mse(hist, symmetric=False),
    }.items():
        assert lo <= a < 0 < b <= hi, name
        widths[name] = b - a
    assert widths["percentile"] < 0.5 * widths["minmax"] and widths["entropy"] < 0.8 * widths["minmax"]
    assert widths["mse"] < widths["minmax"]
    assert len({round(w, 3) for w in widths.values()}) == 4
