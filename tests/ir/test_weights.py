"""Big-model mode (`onnxopt.ir.weights`) on small models: thresholds lowered so a 0.5 MB model is staged.

The same code paths as a model over 2 GB (tests/ir/test_big_model.py runs one
through the CLI): weights memory-mapped from the staging directory, new large
weights spilled there, onnxruntime sessions built from files written there,
output saved file to file; the input is never written.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from bench.big_model import make_big_model, outputs
from onnxopt.api import optimize
from onnxopt.errors import UserError
from onnxopt.ir import weights
from onnxopt.ir.model_io import load_model
from onnxopt.runtime.sessions import make_session

K, M = 256, 272


@pytest.fixture
def staged(monkeypatch, tmp_path):
    """A two-layer model with external data, and thresholds low enough to stage and spill it."""
    monkeypatch.setattr(weights, "MAP_EXTERNAL_BYTES", 1 << 18)
    monkeypatch.setattr(weights, "SPILL_BYTES", 1 << 16)
    return make_big_model(tmp_path / "model", k=K, m=M)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loading_stages_external_data_instead_of_reading_it(staged):
    model = load_model(staged)
    big = [t for t in model.graph.initializer if t.name in ("W1", "W2")]
    assert all(weights.is_external(t) and not t.raw_data for t in big)
    location, _, _ = weights.external_info(big[0])
    staged_file = weights.stage_dir() / location
    assert staged_file.read_bytes() == (staged.parent / "big.onnx.data").read_bytes()
    assert (staged.parent / "big.onnx.data").stat().st_nlink == 1  # a copy: onnx refuses hard-linked data
    values = weights.tensor_values(big[0])
    assert isinstance(values, np.memmap) and values.shape == (K, M)
    full = onnx.load(str(staged))
    np.testing.assert_array_equal(values, onnx.numpy_helper.to_array(full.graph.initializer[0]))
    values[0, 0] = 123.0  # copy-on-write: the file keeps its bytes
    assert weights.tensor_values(big[0])[0, 0] != 123.0


def test_sessions_on_staged_models_read_the_weights_from_disk(staged):
    x = np.random.default_rng(0).standard_normal((2, K), dtype=np.float32)
    got = make_session(load_model(staged)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, outputs(staged, x), rtol=1e-6)
    assert not list(weights.stage_dir().glob("session-*"))  # session files go once the session is built


def test_fold_fuse_spills_the_rewritten_weight_and_saves_file_to_file(staged, tmp_path):
    before = _sha(staged.parent / "big.onnx.data")
    result = optimize(str(staged), "fold,fuse", check=2)
    assert result.report["check"]["ok"], result.report["check"]
    fused = next(t for t in result.model.graph.initializer if t.name.endswith("_W_fused"))
    assert weights.external_info(fused)[0] == "spill.data"
    out = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").exists()
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(1).standard_normal((3, K), dtype=np.float32)
    np.testing.assert_allclose(outputs(out, x), outputs(staged, x), rtol=1e-4, atol=1e-5)
    assert _sha(staged.parent / "big.onnx.data") == before


def test_quantize_runs_on_a_staged_model(staged, tmp_path):
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, K), dtype=np.float32)} for _ in range(4)]
    result = optimize(str(staged), "fold,quantize{check_latency=false}", calibration=calib, check=2)
    stats = result.report["passes"][-1]["stats"]
    assert stats["int8_layers"] + stats["int8_stored_layers"] == 2, stats
    assert result.report["check"]["ok"], result.report["check"]
    out = result.save(tmp_path / "q.onnx")
    onnx.checker.check_model(str(out))
    x = rng.standard_normal((2, K), dtype=np.float32)
    ref, got = outputs(staged, x), outputs(out, x)
    assert 10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()) > 25


def test_truncated_external_data_is_one_clear_error(staged):
    data = staged.parent / "big.onnx.data"
    data.write_bytes(data.read_bytes()[: K * M * 4 + 100])
    with pytest.raises(UserError, match="truncated: tensor 'W2'"):
        load_model(staged)


@pytest.mark.parametrize("cap", [None, 1024])
def test_int8_storage_check_layer_by_layer_agrees_with_whole_model(staged, monkeypatch, cap):
    """A staged model checks that onnxruntime folds each int8-stored weight back at load in a model
    of that layer alone (a whole-model session would fold them all at once); small models check the
    whole model. With onnxruntime's constant-folding output cap below the weights' size both must
    keep float weights, and without it both must store int8."""
    from onnxopt.passes.quantize import optimized as qdq
    from onnxopt.runtime import sessions as runtime

    def capped(threads=2, optimize=True):
        so = runtime.session_options(threads, optimize)
        if cap is not None:
            so.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", str(cap))
        return so

    monkeypatch.setattr(qdq, "session_options", capped)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, K), dtype=np.float32)} for _ in range(4)]
    pipeline = "fold,quantize{check_latency=false,latency_aware=false,target_sqnr=200}"
    answers = []
    for threshold in (weights.MAP_EXTERNAL_BYTES, 1 << 40):
        monkeypatch.setattr(weights, "MAP_EXTERNAL_BYTES", threshold)
        result = optimize(str(staged), pipeline, calibration=calib)
        assert weights.has_external(result.model) == (threshold < 1 << 40)
        stats = result.report["passes"][-1]["stats"]
        answers.append(any("does not fold" in n for n in stats["notes"]))
        assert stats["int8_stored_layers"] == (0 if cap else 2), stats
    assert answers == [cap is not None] * 2, answers
