"""Conformance: a fixed, seeded sample of the ONNX backend test corpus through `fold,fuse`.

Every sampled case that onnxruntime passes as given must still pass after
optimization (no regressions), and the optimizer must not raise on it. The
full corpus runs in `bench/conformance.py` (report in bench/results/conformance.md).
"""

from __future__ import annotations

import pytest

from onnxopt.testing.conformance import Case, iter_cases, markdown, run_corpus, sample_cases

#: Cases sampled from the corpus (of ~2000); the whole corpus takes ~1 minute on one free core.
SAMPLE = 500
#: Cases that were regressions once; always in the sample.
PINNED = {
    "test_identity_opt",
    "test_if_opt",
    "test_optional_get_element_optional_sequence",
    "test_optional_has_element_empty_optional_input",
}


@pytest.fixture(scope="module")
def corpus() -> list[Case]:
    return list(iter_cases())


def test_corpus_has_every_kind(corpus):
    kinds = {c.kind for c in corpus}
    assert kinds == {"node", "simple", "pytorch-converted", "pytorch-operator", "light"}
    assert len(corpus) > 1500


def test_sample_is_fixed(corpus):
    a = [c.name for c in sample_cases(corpus, 50, seed=0)]
    assert a == [c.name for c in sample_cases(corpus, 50, seed=0)]
    assert a != [c.name for c in sample_cases(corpus, 50, seed=1)]


def test_fold_fuse_has_no_regressions_on_a_seeded_sample(corpus):
    light = [c for c in corpus if c.kind == "light" and c.name in ("light_squeezenet", "light_resnet50")]
    rest = [c for c in corpus if c.kind != "light"]
    pinned = [c for c in rest if c.name in PINNED]
    cases = light + pinned + [c for c in sample_cases(rest, SAMPLE, seed=0) if c.name not in PINNED]
    summary = run_corpus(cases, "fold,fuse")
    counts = summary.counts()
    assert counts["ort_pass"] > 0.6 * counts["cases"], markdown(summary)
    assert not summary.regressions, markdown(summary)
    assert counts["nodes_removed"] > 0 and counts["cases_changed"] > 0
