"""The HTML report: self-contained (nothing fetched), charts drawn, tables not cut; and the per-pass
one-line summaries that the terminal, the JSON and the page share."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("matplotlib", reason="the HTML report's charts need matplotlib (the 'report' extra)")

from onnxopt.cli.app import main  # noqa: E402
from onnxopt.report.html import render_html  # noqa: E402
from tests.test_diff import ALL_INT8, samples, small_cnn  # noqa: E402

#: Anything a browser would fetch: src/href/url() pointing at a network address, or a protocol-relative one.
EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory) -> tuple:
    d = tmp_path_factory.mktemp("html")
    onnx.save(small_cnn(), d / "m.onnx")
    calib = d / "calib"
    calib.mkdir()
    for i, s in enumerate(samples(4)):
        np.savez(calib / f"{i}.npz", **s)
    assert main(["optimize", str(d / "m.onnx"), "-o", str(d / "q.onnx"), "-p", ALL_INT8, "--calib", str(calib),
                 "--report", str(d / "r.json"), "-q"]) == 0  # fmt: skip
    return d, json.loads((d / "r.json").read_text())


def test_json_report_carries_one_summary_line_per_pass(optimized) -> None:
    _, report = optimized
    lines = {r["name"]: r["summary"] for r in report["passes"]}
    assert lines["quantize"].startswith("quantize: 4/4 layers int8 (100% of MACs), ")
    assert lines["fold"].startswith("fold: changed nothing: ")


def test_page_is_self_contained_and_has_the_charts(optimized, tmp_path) -> None:
    d, _ = optimized
    assert main(["diff", str(d / "m.onnx"), str(d / "q.onnx"), "--report", str(tmp_path / "d.json"), "-q"]) == 0
    assert main(["report", str(d / "r.json"), "--diff", str(tmp_path / "d.json"), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert not EXTERNAL.findall(page)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    for chart in ("quantize", "diff"):
        assert f"<figure class=chart id=chart-{chart}><svg" in page
    assert page.count("<svg") == 2
    assert "no tensor diverges beyond the limits" in page


def test_every_stat_is_shown_in_full() -> None:
    long_value = "x" * 500
    report = {
        "passes": [{"name": "p", "seconds": 0.1, "changed": True, "stats": {"note": long_value, "n": 3}, "skipped": []}]
    }
    page = render_html(report)
    assert long_value in page and "n = 3" in page


def test_prune_lowrank_and_validation_rows_are_charted() -> None:
    report = {
        "passes": [
            {"name": "prune", "seconds": 1, "changed": True, "stats": {}, "skipped": [], "details": [
                {"group": "g0", "channels_before": 64, "channels_after": 40},
                {"group": "g1", "channels_before": 32, "channels_after": 32}]},
            {"name": "lowrank", "seconds": 1, "changed": True, "stats": {}, "skipped": [], "details": [
                {"node": "fc1", "rank": 16, "max_useful_rank": 64, "energy_kept": 0.97},
                {"node": "fc2", "rank": 0, "max_useful_rank": 32, "energy_kept": 1.0}]},
        ],
        "validation": {"verdict": "PASSED", "eps": [
            {"ep": "cpu", "status": "passed", "checks": [{"output": "y", "sqnr_db": 31.0}],
             "placement": {"on_target": 10, "total": 10}, "latency": {"ref_ms": 2.0, "cand_ms": 1.5, "ratio": 0.75}},
            {"ep": "openvino", "status": "failed", "checks": [{"output": "y", "sqnr_db": 12.0}],
             "placement": {"on_target": 9, "total": 10}, "latency": {"ref_ms": 2.0, "cand_ms": 1.0, "ratio": 0.5}}]},
    }  # fmt: skip
    page = render_html(report)
    assert page.count("<svg") == 3
    for title in ("prune: channels per group", "lowrank: rank and energy", "validation: accuracy per EP"):
        assert f"<figcaption>{title}" in page
    assert "9 of 10 nodes" in page and not EXTERNAL.findall(page)


def test_latency_rows_are_charted() -> None:
    rows = [{"node": "c1", "int8_latency_ratio": 0.7}, {"node": "c2", "int8_latency_ratio": 1.2}]
    page = render_html({"passes": [{"name": "q", "seconds": 1, "changed": True, "stats": {}, "skipped": [],
                                    "details": rows}]})  # fmt: skip
    assert "<figcaption>quantize: per-layer latency, int8 vs float</figcaption>" in page


def test_optimize_writes_html_when_asked(optimized, tmp_path) -> None:
    d, _ = optimized
    out = tmp_path / "r.html"
    assert main(["optimize", str(d / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--report", str(out), "-q"]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Before and after" in page


def test_report_of_a_missing_or_bad_file_is_a_user_error(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert main(["report", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x.html")]) == 2


def test_quantize_summary_tells_undecided_timings_from_slower_ones() -> None:
    from onnxopt.passes.quantize.summary import summary_line

    record = {
        "changed": True,
        "stats": {"int8_layers": 1, "candidates": 3},
        "details": [
            {"int8": True, "why": "faster and accurate enough"},
            {"int8": False, "why": "int8 slower (1.40x (1.20-1.60) float)"},
            {"int8": False, "why": "int8 not faster beyond the noise (0.95x (0.80-1.10) float)"},
        ],
    }
    line = summary_line(record)
    assert "1 slower" in line and "1 not faster beyond the noise" in line, line
