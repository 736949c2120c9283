"""Tests of the `lowrank` pass and its rank-budget kernels (kernels/lowrank_budget.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxopt
from onnxopt.ir.graph import import_model
from onnxopt.kernels.lowrank import truncated_svd
from onnxopt.kernels.lowrank_budget import (
    LayerCurve,
    allocate_ranks,
    allowed_ranks,
    corrected_bias,
    output_energy,
    plain_error_curve,
    relative_output_error,
    whitened_error_curve,
)
from onnxopt.passes.lowrank.layers import Layer
from onnxopt.passes.lowrank.timing import timing_key
from onnxopt.runtime.sessions import make_session
from onnxopt.runtime.timing import TimingCache

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path, monkeypatch):
    """Every test times (or pre-seeds) layers in its own cache, so no result leaks between tests."""
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path / "cache"))


def _low_rank(m: int, n: int, r: int, noise: float = 0.0) -> np.ndarray:
    w = RNG.standard_normal((m, r)) @ RNG.standard_normal((r, n)) / np.sqrt(r)
    return (w + noise * RNG.standard_normal((m, n))).astype(np.float32)


def _matmul_model(W: np.ndarray, b: np.ndarray | None = None, constant_node: bool = False) -> onnx.ModelProto:
    m, n = W.shape
    nodes, inits = [], []
    if constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W, "Wc")))
    else:
        inits.append(numpy_helper.from_array(W, "W"))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["h" if b is not None else "y"], name="mm"))
    if b is not None:
        inits.append(numpy_helper.from_array(b, "b"))
        nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="add"))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "T", m])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])


def _calib(shape: tuple[int, ...], n: int = 4, shift: float = 0.5) -> list[dict[str, np.ndarray]]:
    """Correlated, non-centered activations (what whitening is for)."""
    mix = RNG.standard_normal((shape[-1], shape[-1])) * np.linspace(2.0, 0.05, shape[-1])[:, None]
    return [{"x": (RNG.standard_normal(shape) @ mix + shift).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(model).run(None, feeds)[0]


def _lowrank_record(result: onnxopt.Result) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == "lowrank")


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


# ------------------------------------------------------------------ kernels (rank budgets)
def test_error_curves_fall_with_rank_and_match_the_factors():
    W = RNG.standard_normal((24, 40))
    X = RNG.standard_normal((500, 24)) @ RNG.standard_normal((24, 24)) + 0.3
    S, mu = X.T @ X / len(X), X.mean(0)
    cov = S - np.outer(mu, mu)
    plain = plain_error_curve(W)
    white = whitened_error_curve(W, cov, output_energy(W, S, mu), eps=1e-12)
    for curve in (plain, white):
        assert np.all(np.diff(curve) <= 1e-12) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    A, B = truncated_svd(W, 5)
    assert np.linalg.norm(W - A @ B) ** 2 / np.linalg.norm(W) ** 2 == pytest.approx(plain[5])
    # The bias correction removes the mean error, so the exact error is the centered one.
    from onnxopt.kernels.lowrank import whitened_svd

    A, B, _ = whitened_svd(W, cov, 5, eps=1e-12)
    nb = corrected_bias(W, A, B, mu)
    err = (X @ W) - (X @ A @ B + nb)
    measured = np.sqrt((err**2).sum() / ((X @ W) ** 2).sum())
    assert relative_output_error(W, A, B, S, mu, None, nb) == pytest.approx(measured, rel=1e-6)
    assert measured**2 == pytest.approx(white[5], rel=1e-6)


def test_allocator_meets_parameter_budget_and_prefers_cheap_layers():
    m, n = 64, 64
    steep = np.linspace(1, 0, 65) ** 8  # error vanishes fast: cheap to cut
    flat = np.linspace(1, 0, 65)  # every rank matters
    layers = [LayerCurve(m, n, steep), LayerCurve(m, n, flat)]
    ranks = allocate_ranks(layers, multiple=8, params=0.3)
    saved = sum(m * n - r * (m + n) for r in ranks if r)
    assert saved >= 0.3 * 2 * m * n
    assert ranks[0] > 0 and all(r % 8 == 0 for r in ranks)
    assert ranks[1] == 0 or ranks[1] > ranks[0]
    assert allocate_ranks(layers, multiple=8, params=0.0) == [0, 0]
    assert allocate_ranks(layers, multiple=8, error=0.0) == [0, 0]
    ranks = allocate_ranks(layers, multiple=8, error=0.1)
    assert sum(layers[i].err2[r] for i, r in enumerate(ranks) if r) <= 0.1**2 + 1e-12
    assert allowed_ranks(10, 10, 8) == [4, 3, 2, 1]  # too small for a multiple of 8: every useful rank


# ------------------------------------------------------------------ the pass: exactness
@pytest.mark.parametrize("data", [False, True], ids=["svd", "whiten"])
def test_full_rank_of_the_weight_reproduces_outputs(data):
    W, b = _low_rank(96, 80, 8), RNG.standard_normal(80).astype(np.float32)
    model = _matmul_model(W, b, constant_node=True)
    calib = _calib((1, 16, 96))
    res = onnxopt.optimize(model, "lowrank{energy=1.0,timing=false}", calibration=calib if data else None)
    rec = _lowrank_record(res)
    assert rec["changed"] and rec["details"][0]["rank"] == 8
    assert _ops(res.model) == ["MatMul", "MatMul", "Add"]
    x = calib[0]["x"]
    ref = _run(model, {"x": x})
    np.testing.assert_allclose(_run(res.model, {"x": x}), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_zero_budget_changes_nothing():
    model = _matmul_model(RNG.standard_normal((64, 64)).astype(np.float32))
    for pipe in ("lowrank{params=0}", "lowrank{error=0}"):
        res = onnxopt.optimize(model, pipe, calibration=_calib((1, 8, 64)))
        assert not _lowrank_record(res)["changed"]
        assert _ops(res.model) == ["MatMul"]


def test_gemm_with_transposes_alpha_beta():
    m, n, rows = 48, 40, 32
    W = _low_rank(m, n, 8)
    C = RNG.standard_normal(n).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "Wt", "C"], ["y"], name="gemm", transA=1, transB=1, alpha=0.7, beta=1.3)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [m, rows])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(np.ascontiguousarray(W.T), "Wt"), numpy_helper.from_array(C, "C")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = [{"x": s["x"][0].T.copy()} for s in _calib((1, rows, m))]
    for pipe, data in (("lowrank{energy=1.0,timing=false}", None), ("lowrank{energy=1.0,timing=false}", calib)):
        res = onnxopt.optimize(model, pipe, calibration=data)
        assert _ops(res.model) == ["Gemm", "Gemm"]
        x = calib[0]["x"]
        ref = _run(model, {"x": x})
        np.testing.assert_allclose(_run(res.model, {"x": x}), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # Truncated below the weight's rank, the data-aware factors beat plain SVD on the calibration data.
    W = _low_rank(m, n, 24, noise=0.05)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(W.T), "Wt"))
    x = calib[0]["x"]
    ref = _run(model, {"x": x})
    errs = {}
    for method in ("whiten", "svd"):
        # min_cosine=0: both methods at the full budget (unguarded), to compare their errors
        res = onnxopt.optimize(
            model, f"lowrank{{params=0.5,timing=false,method={method},min_cosine=0}}", calibration=calib
        )
        assert _lowrank_record(res)["stats"]["fraction_removed"] >= 0.5
        errs[method] = np.linalg.norm(_run(res.model, {"x": x}) - ref) / np.linalg.norm(ref)
    assert errs["whiten"] < errs["svd"]


def test_one_by_one_conv_is_factorized_as_two_convs():
    cin, cout = 64, 48
    W = _low_rank(cout, cin, 8).reshape(cout, cin, 1, 1)
    b = RNG.standard_normal(cout).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", kernel_shape=[1, 1]),
            helper.make_node("Conv", ["y", "W2"], ["z"], name="strided", strides=[2, 2]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, 6, 5])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(W, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(_low_rank(cout, cout, 4).reshape(cout, cout, 1, 1), "W2"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = [{"x": RNG.standard_normal((1, cin, 6, 5)).astype(np.float32) + 0.2} for _ in range(3)]
    assert not _lowrank_record(onnxopt.optimize(model, "lowrank{energy=1.0,timing=false}"))["changed"]
    res = onnxopt.optimize(model, "lowrank{energy=1.0,timing=false,ops=Conv}", calibration=calib)
    rec = _lowrank_record(res)
    assert _ops(res.model) == ["Conv", "Conv", "Conv"]
    assert any(s["node"] == "strided" for s in rec["skipped"])
    ref = _run(model, calib[0])
    np.testing.assert_allclose(_run(res.model, calib[0]), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert rec["details"][0]["measured_error"] < 1e-5


# ------------------------------------------------------------------ the pass: must not fire
def test_dynamic_weight_is_left_alone():
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64]),
            helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [64, 64]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 64])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    res = onnxopt.optimize(model, "lowrank{params=0.5,timing=false}")
    rec = _lowrank_record(res)
    assert not rec["changed"]
    assert rec["skipped"] == [{"node": "mm", "op": "MatMul", "reason": "weight is not a constant"}]


def test_rank_that_saves_nothing_is_not_used():
    model = _matmul_model(RNG.standard_normal((64, 64)).astype(np.float32))  # full rank, flat spectrum
    res = onnxopt.optimize(model, "lowrank{energy=0.999,timing=false}")
    rec = _lowrank_record(res)
    assert not rec["changed"] and _ops(res.model) == ["MatMul"]
    assert "saves nothing" in rec["skipped"][0]["reason"]


@pytest.mark.parametrize("factorized_faster", [False, True])
def test_timing_decides(factorized_faster):
    """With the layer's timing in the cache, a slower factorized form is never used, a faster one is."""
    W, b = _low_rank(96, 80, 8), RNG.standard_normal(80).astype(np.float32)
    model = _matmul_model(W, b)
    calib = _calib((1, 16, 96))
    node = next(n for n in import_model(model).nodes if n.op == "MatMul")
    layer = Layer(node, "MatMul", node.inputs[0], W.astype(np.float64), W.dtype, "last", bias=b, in_shape=(1, 16, 96))
    dense, fact = (2e-5, 1e-5) if factorized_faster else (1e-5, 2e-5)
    TimingCache("lowrank").put(timing_key(layer, 8), [dense, fact])
    res = onnxopt.optimize(model, "lowrank{energy=1.0}", calibration=calib)
    rec = _lowrank_record(res)
    assert rec["changed"] is factorized_faster
    assert rec["details"][0]["dense_us"] == pytest.approx(dense * 1e6)
    if not factorized_faster:
        assert _ops(res.model) == ["MatMul", "Add"]
        assert "not faster" in rec["skipped"][0]["reason"]


def test_parameter_budget_over_several_layers_is_met_with_rounded_ranks():
    W1, W2 = _low_rank(128, 128, 16, 0.01), _low_rank(128, 96, 64, 0.01)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="b"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    res = onnxopt.optimize(model, "lowrank{params=0.3,multiple=8,timing=false}", calibration=_calib((1, 32, 128)))
    rec = _lowrank_record(res)
    assert rec["stats"]["fraction_removed"] >= 0.3
    assert all(d["rank"] % 8 == 0 for d in rec["details"])
    for d in rec["details"]:
        if d["rank"]:
            assert d["measured_error"] == pytest.approx(d["predicted_error"], rel=0.5, abs=2e-3)


# ------------------------------------------------------------------ real model
def test_pp_ocr_rec_thirty_percent_fewer_matmul_parameters(tmp_path):
    """PP-OCRv4 rec (weights in Constant nodes): params=0.3 through the API with a calibration directory."""
    from fixtures.fetch_models import model_path

    path = model_path("rec")
    if not path.exists():
        pytest.skip(f"{path} missing: run python fixtures/fetch_models.py")
    from fixtures import ocr_data

    calib_dir = tmp_path / "calib"
    ocr_data.write_calibration_dir(ocr_data.rec_samples(4, ocr_data.CALIB_SEED), calib_dir)
    res = onnxopt.optimize(path, "lowrank{params=0.3}", calibration=calib_dir)
    rec = _lowrank_record(res)
    assert rec["changed"] and rec["stats"]["fraction_removed"] >= 0.3
    onnx.checker.check_model(res.model)
    for d in rec["details"]:
        if d["rank"]:
            assert d["factorized_us"] * 1.05 <= d["dense_us"]
            assert d["rank"] % 8 == 0 and d["measured_error"] < 0.1
    x = ocr_data.rec_samples(2, ocr_data.EVAL_SEED)
    orig = make_session(str(path))
    new = make_session(res.model)
    for sample, _ in x:
        a, b = orig.run(None, {"x": sample})[0], new.run(None, {"x": sample})[0]
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


def test_layers_sharing_an_input_share_the_first_factor():
    m, n = 64, 48
    U = RNG.standard_normal((m, 8))
    weights = [(U @ RNG.standard_normal((8, n))).astype(np.float32) for _ in range(3)]  # common row space
    nodes, inits, outs = [], [], []
    for i, w in enumerate(weights):
        nodes += [
            helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"proj{i}"),
            helper.make_node("Add", [f"h{i}", f"b{i}"], [f"y{i}"]),
        ]
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), f"b{i}"),
        ]
        outs.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, m])], outs, inits
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    calib = _calib((1, 16, m))
    res = onnxopt.optimize(model, "lowrank{energy=1.0,timing=false,share=true}", calibration=calib)
    rec = _lowrank_record(res)
    assert rec["details"][0]["node"] == "proj0+proj1+proj2" and rec["details"][0]["rank"] == 8
    assert _ops(res.model).count("MatMul") == 4
    ref = make_session(model).run(None, calib[0])
    for a, b in zip(ref, make_session(res.model).run(None, calib[0])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


# ------------------------------------------------------------------ the accuracy guard
def _two_layer_model(W1: np.ndarray, W2: np.ndarray) -> onnx.ModelProto:
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="costly"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="cheap"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "T", W1.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _iso_calib(shape: tuple[int, ...], n: int) -> list[dict[str, np.ndarray]]:
    """Uncorrelated activations with more rows than channels: whitening cannot hide a rank cut."""
    return [{"x": RNG.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _worst_cosine(model: onnx.ModelProto, cand: onnx.ModelProto, samples: list[dict]) -> float:
    from onnxopt.kernels.metrics import cosine

    a, b = make_session(model), make_session(cand)
    return min(cosine(a.run(None, s)[0], b.run(None, s)[0]) for s in samples)


def test_guard_backs_off_a_budget_that_breaks_accuracy():
    """params=0.6 forces a rank cut into a full-rank layer; the guard gives that layer back, and only that one."""
    costly = (RNG.standard_normal((128, 128)) / np.sqrt(128)).astype(np.float32)  # flat spectrum
    cheap = _low_rank(128, 128, 8, noise=0.001)  # nearly rank 8
    model = _two_layer_model(costly, cheap)
    calib = _iso_calib((1, 64, 128), 4)
    free = onnxopt.optimize(model, "lowrank{params=0.6,timing=false,min_cosine=0}", calibration=calib)
    unguarded = _worst_cosine(model, free.model, calib)
    assert _lowrank_record(free)["stats"]["factorized"] == 2 and unguarded < 0.99
    res = onnxopt.optimize(model, "lowrank{params=0.6,timing=false}", calibration=calib)
    rec = _lowrank_record(res)
    st = rec["stats"]
    assert rec["changed"] and st["factorized"] == 1 and st["guard"].startswith("backed off")
    assert 0 < st["fraction_removed"] < st["fraction_chosen_before_guard"]
    assert st["guard_held_out"] and st["guard_cosine"] >= 0.99
    assert _worst_cosine(model, res.model, calib) >= 0.99
    assert _worst_cosine(model, res.model, _iso_calib((1, 64, 128), 4)) >= 0.99  # data it never saw
    assert [s["node"] for s in rec["skipped"] if "accuracy guard" in s["reason"]] == ["costly"]
    # a looser target keeps the whole budget: the option decides
    loose = onnxopt.optimize(
        model, f"lowrank{{params=0.6,timing=false,min_cosine={unguarded - 1e-3:.6f}}}", calibration=calib
    )
    assert _lowrank_record(loose)["stats"]["factorized"] == 2


def test_guard_leaves_the_model_unchanged_when_no_factorization_meets_the_target():
    model = _matmul_model((RNG.standard_normal((96, 96)) / 10).astype(np.float32))  # full rank, flat
    calib = _iso_calib((1, 64, 96), 3)
    res = onnxopt.optimize(model, "lowrank{params=0.5,timing=false}", calibration=calib)
    rec = _lowrank_record(res)
    assert not rec["changed"] and _ops(res.model) == ["MatMul"]
    assert "accuracy guard" in rec["reason"] and "unchanged" in rec["reason"]
    assert rec["stats"]["factorized"] == 0 and rec["stats"]["guard_held_out"] is True


def test_guard_measures_on_held_out_samples_when_there_are_enough():
    from onnxopt.verify.accuracy_guard import split_samples

    samples = [{"x": np.full((1,), i, np.float32)} for i in range(12)]
    split = split_samples(samples, 0.25, 2)
    assert split.held_out and len(split.fit) == 9 and len(split.held) == 3
    assert [int(s["x"][0]) for s in split.guard] == [9, 10]  # at most `limit` of the held-out samples
    split = split_samples(samples[:2], 0.25, 8)  # two samples: one fits, one checks
    assert split.held_out and len(split.fit) == 1 and len(split.guard) == 1
    split = split_samples(samples[:1], 0.25, 8)  # nothing to spare: measured in-sample, and said so
    assert not split.held_out and len(split.fit) == 1 and len(split.guard) == 1
    # one batched sample (a file of 8 rows, batch dimension dynamic): its last quarter of rows checks
    model = _matmul_model(np.eye(4, dtype=np.float32))
    batch = [{"x": np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 4)}]
    split = split_samples(batch, 0.25, 8, model)
    assert split.held_out and split.fit[0]["x"].shape[0] == 6 and split.guard[0]["x"].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([split.fit[0]["x"], split.held[0]["x"]]), batch[0]["x"])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8  # a fixed first dimension is no batch
    assert not split_samples(batch, 0.25, 8, model).held_out
