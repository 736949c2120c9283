"""Fast tests for fixtures/ocr_data.py (synthetic PP-OCR data).

Model-dependent tests are skipped when the PP-OCR models are not unpacked.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "ocr_data.py"
_SPEC = importlib.util.spec_from_file_location("ocr_data", _PATH)
ocr = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("ocr_data", ocr)
_SPEC.loader.exec_module(ocr)

needs_rec = pytest.mark.skipif(not ocr.REC_MODEL.exists(), reason=f"PP-OCR rec model not found at {ocr.REC_MODEL}")


def test_ctc_greedy_decode_hand_made():
    chars = ["blank", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3, 2, 0]
    probs = np.full((len(steps), len(chars)), 0.01, dtype=np.float32)
    probs[np.arange(len(steps)), steps] = 0.97
    assert ocr.ctc_greedy_decode(probs, chars) == ["aab b"]
    only_blank = np.zeros_like(probs)
    only_blank[:, 0] = 1.0
    batch = np.stack([probs, only_blank])
    assert ocr.ctc_greedy_decode(batch, chars) == ["aab b", ""]
    with pytest.raises(ValueError):
        ocr.ctc_greedy_decode(probs, chars[:-1])


def test_random_strings_realistic_and_deterministic():
    a = ocr.random_strings(50, 0)
    assert a == ocr.random_strings(50, 0)
    assert len(set(a)) == 50
    assert all(3 <= len(s) <= 25 and s == s.strip() for s in a)
    assert all(set(s) <= ocr.DEFAULT_CHARSET for s in a)
    digits_only = ocr.random_strings(20, 2, charset="0123456789 .-/:")
    assert all(set(s) <= set("0123456789 .-/:") for s in digits_only)


def test_calibration_and_evaluation_seeds_disjoint():
    calib = set(ocr.random_strings(400, ocr.CALIB_SEED))
    evals = set(ocr.random_strings(400, ocr.EVAL_SEED))
    assert not calib & evals
    assert not set(ocr.random_strings(100, 2)) & set(ocr.random_strings(100, 3))


def test_rec_samples_deterministic_with_varying_widths():
    s1 = ocr.rec_samples(24, 0)
    s2 = ocr.rec_samples(24, 0)
    assert [t for _, t in s1] == [t for _, t in s2]
    assert all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(s1, s2))
    widths = {x.shape[-1] for x, _ in s1}
    assert all(x.shape[:3] == (1, 3, 48) and x.dtype == np.float32 for x, _ in s1)
    assert min(widths) >= ocr.REC_MIN_WIDTH and len(widths) > 1
    assert all(-1.0 <= x.min() and x.max() <= 1.0 for x, _ in s1)
    narrow = ocr.rec_samples(12, 0, min_width=48)
    assert len({x.shape[-1] for x, _ in narrow}) >= 6


def test_cls_and_det_shapes(tmp_path):
    cls = ocr.cls_samples(8, 0)
    assert all(x.shape == (1, 3, 48, 192) for x, _ in cls)
    assert sorted(label for _, label in cls) == [0] * 4 + [1] * 4
    det = ocr.det_samples(3, 0, size=[(320, 320), (256, 384)])
    assert [d.shape for d in det] == [(1, 3, 320, 320), (1, 3, 256, 384), (1, 3, 320, 320)]
    with pytest.raises(ValueError):
        ocr.det_samples(1, 0, size=(300, 320))
    paths = ocr.write_calibration_dir(cls[:2], tmp_path / "calib")
    with np.load(paths[1]) as z:
        assert list(z.keys()) == ["x"] and np.array_equal(z["x"], cls[1][0])


def test_det_metrics():
    ref = np.zeros((1, 1, 8, 8), dtype=np.float32)
    ref[0, 0, 2:4, 2:6] = 0.9
    assert ocr.det_metrics(ref, ref) == {"sqnr_db": float("inf"), "mask_iou": 1.0}
    cand = ref.copy()
    cand[0, 0, 2:4, 4:6] = 0.1
    m = ocr.det_metrics(ref, cand)
    assert m["mask_iou"] == pytest.approx(0.5)
    assert 0 < m["sqnr_db"] < 10


@needs_rec
def test_rec_character_list_matches_model():
    chars = ocr.rec_character_list(ocr.REC_MODEL)
    assert len(chars) == 6625 and chars[0] == "blank" and chars[-1] == " "
    assert ocr.DEFAULT_CHARSET <= set(chars)


@needs_rec
def test_float_rec_reads_rendered_text():
    pytest.importorskip("onnxruntime")
    run = ocr.make_ort_runner(ocr.REC_MODEL, threads=1)
    samples = ocr.rec_samples(10, ocr.EVAL_SEED)
    assert ocr.rec_accuracy(run, samples, ocr.rec_character_list(ocr.REC_MODEL)) >= 0.8
