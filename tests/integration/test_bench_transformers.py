"""Smoke tests of bench/transformers.py's helpers (inputs, pooling, comparison, criteria, tables); no timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import transformers as bt

VOCAB = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "a": 1037, "cat": 4937, "sat": 2938, ".": 1012}


def test_fixed_length_pads_and_truncates_to_exactly_l():
    short, long = bt.encode_fixed(["A cat sat.", "a cat sat a cat sat a cat sat."], 6, VOCAB)
    assert short["input_ids"].tolist() == [[101, 1037, 4937, 2938, 1012, 102]]
    assert long["input_ids"].tolist() == [[101, 1037, 4937, 2938, 1037, 102]]  # truncated, [SEP] kept
    assert long["attention_mask"].tolist() == [[1] * 6]
    (padded,) = bt.encode_fixed(["A cat."], 8, VOCAB)
    assert padded["input_ids"].tolist() == [[101, 1037, 4937, 1012, 102, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert padded["input_ids"].dtype == np.int64


def test_natural_lengths_have_no_padding():
    (f,) = bt.encode_natural(["A cat sat."], VOCAB)
    assert f["input_ids"].shape == (1, 6) and f["attention_mask"].all()


def _outputs(tok: np.ndarray, pooled: bool) -> dict[str, np.ndarray]:
    out = {"ids": np.zeros((1, tok.shape[1]), np.int64), "tok": tok}
    if pooled:
        out["pool"] = tok[:, :2].mean(1)
    return out


def test_output_roles_and_pooling():
    tok = np.arange(24, dtype=np.float32).reshape(1, 3, 8)
    mask = np.array([[1, 1, 0]])
    roles = bt.output_roles(_outputs(tok, pooled=True))
    assert (roles.token, roles.pooled) == ("tok", "pool")
    np.testing.assert_allclose(bt.sentence_embedding(_outputs(tok, True), roles, mask), tok[:, :2].mean(1))
    no_pool = bt.output_roles(_outputs(tok, pooled=False))
    assert no_pool.pooled is None
    np.testing.assert_allclose(bt.sentence_embedding(_outputs(tok, False), no_pool, mask), tok[:, :2].mean(1))


def test_compare_exact_and_renamed_outputs():
    rng = np.random.default_rng(0)
    feeds = [{"attention_mask": np.array([[1, 1, 0]])} for _ in range(4)]
    ref = [_outputs(rng.standard_normal((1, 3, 8)).astype(np.float32), True) for _ in feeds]
    roles = bt.output_roles(ref[0])
    same = bt.compare(ref, [dict(r) for r in ref], roles, feeds)
    assert same["exact"] and same["max_abs"] == 0 and same["nn_agreement"] == 1 and same["cos_min"] > 0.999999
    renamed = [{f"o{i}": v for i, v in enumerate(r.values())} for r in ref]  # matched by position
    assert bt.compare(ref, renamed, roles, feeds)["exact"]
    noisy = [{k: v + 0.01 if v.dtype.kind == "f" else v for k, v in r.items()} for r in ref]
    m = bt.compare(ref, noisy, roles, feeds)
    assert not m["exact"] and 0.009 < m["max_abs"] < 0.011


def _row(name: str, **kw) -> bt.Row:
    v = next(x for x in bt.VARIANTS if x.name == name)
    latency = kw.pop("latency", None)
    row = bt.Row(bt.Built(v, Path("m.onnx")), **kw)
    row.latency = [latency] if latency is not None else []
    return row


def test_criteria_pass_fail_and_missing():
    rows = [
        _row("float", nodes=354, size_ratio=1.0, latency=1.0, exact=True),
        _row(bt.FUSE, nodes=100, size_ratio=1.0, latency=0.7, exact=True, max_abs=0.0),
        _row(bt.ORT_OPTIMIZER, nodes=60, latency=0.8),
        _row("onnxslim", nodes=210, latency=1.0),
        _row("ort quantize_dynamic", latency=0.9),
        _row("ort optimizer + quantize_dynamic", latency=0.6),
        _row(bt.QUANTIZE[0], cos_mean=0.995, cos_min=0.98, nn=1.0, size_ratio=0.3, latency=0.5),
        _row(bt.QUANTIZE[1], cos_mean=0.98, cos_min=0.95, nn=0.9, size_ratio=0.8, latency=0.7),
    ]
    verdicts = {name: verdict for name, verdict, _ in bt.criteria(rows)}
    assert all(verdicts[k] == "PASS" for k in verdicts if k.startswith(bt.FUSE + ":"))
    q0 = [verdicts[k] for k in verdicts if k.startswith(bt.QUANTIZE[0] + ":")]
    assert q0 == ["PASS"] * 4  # 0.5 <= 0.9 x 0.6
    q1 = [verdicts[k] for k in verdicts if k.startswith(bt.QUANTIZE[1] + ":")]
    assert q1 == ["FAIL"] * 4
    q2 = [verdicts[k] for k in verdicts if k.startswith(bt.QUANTIZE[2] + ":")]
    assert q2 == ["N/A"] * 4  # not built


def test_table_and_summary_render_failures():
    v = bt.VARIANTS[-1]
    failed = bt.Row(bt.Built(v, None, error="failed (exit 1): boom | crash"))
    text = bt.table([_row("float", nodes=354, size_ratio=1.0, latency=1.0), failed])
    assert "failed (exit 1): boom / crash" in text and text.count("\n") == 3
    summary = bt.summary({16: [("c", "PASS", "x")], 64: [("c", "FAIL", "y")]})
    assert "| c | PASS (x) | FAIL (y) |" in summary


def test_arguments_quick_defaults():
    args = bt.parse_args(["--quick", "--lengths", "16"])
    assert (args.sentences, args.reps, args.lengths) == (64, 2, "16")
    assert bt.parse_args(["--reps", "7"]).reps == 7
