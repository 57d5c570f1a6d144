"""``model: "auto"``: which requests need the primary model, from the request's own text.

Two signals, either of which sends a request to the primary model (the rest are simple and go to the
small one):

* :func:`classify`, a heuristic over the user's messages: code, maths or multi-step reasoning signals, or
  length. Precise, but it misses requests that only read as technical.
* :class:`RouteClassifier`, a logistic regression over the last user message's all-MiniLM-L6-v2 embedding
  (384 floats, L2-normalised, :mod:`core.embeddings`), trained on ``core/routing_labels.jsonl`` (160
  prompts labelled ``small`` / ``primary``) by ``python -m core.routing`` into
  ``core/models/route_classifier.npz``: P(primary) = sigmoid(w·x + b), primary at >= ``threshold``.

``bench/routing.py`` measures both, and the two together, on a held-out labelled set
(``bench/data/routing_eval.jsonl``; README, *Measured*). The edge (:mod:`edge.routing`) uses both; batch
jobs (:mod:`batches.input`) only the heuristic (no embedding per line at upload).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from schemas.events import ChatMessage

HERE = Path(__file__).resolve().parent
LABELS = HERE / "routing_labels.jsonl"
ARTEFACT = HERE / "models" / "route_classifier.npz"

AUTO = "auto"
LONG_PROMPT_CHARS = 1200  # a request this long (its last user message and history) goes to the primary model

_CODE = re.compile(
    r"```|\b(def|class|import|return|lambda|async|await|const|let|var|fn|impl|struct|SELECT|INSERT|UPDATE|JOIN|"
    r"traceback|exception|stack trace|segfault|compile[rd]?|regex|regexp|function|method|variable|array|"
    r"python|javascript|typescript|java|rust|golang|c\+\+|sql|bash|shell script|dockerfile|yaml|json|html|css|api|"
    r"bug|debug|refactor|unit test|algorithm|recursion|big-?o|complexity)\b|[{};]\s*$|\w+\(\)|\w+\.\w+\(",
    re.IGNORECASE | re.MULTILINE,
)
_REASONING = re.compile(
    r"\b(prove|proof|derive|step by step|step-by-step|explain why|calculate|compute|solve|equation|integral|"
    r"derivative|probability|optimi[sz]e|compare and contrast|trade-?offs?|design a|architecture|analy[sz]e)\b|"
    r"\d+\s*[-+*/^%]\s*\d+",
    re.IGNORECASE,
)


def classify(messages: list[ChatMessage]) -> tuple[bool, str]:
    """``(needs the primary model, why)`` for a request's messages: code, reasoning or length signals in
    the user's text. A heuristic, measured against a labelled set in ``bench/routing.py`` (README)."""
    users = [m.content or "" for m in messages if m.role == "user"]
    last = users[-1] if users else ""
    text = "\n".join(users)
    if _CODE.search(last):
        return True, "code"
    if _REASONING.search(last):
        return True, "reasoning"
    if len(text) > LONG_PROMPT_CHARS or len(last.split()) > 120:
        return True, "long"
    if any(m.tool_calls or m.role == "tool" for m in messages):
        return True, "tools"
    return False, "simple"


def last_user_text(messages: list[ChatMessage]) -> str:
    return next((m.content or "" for m in reversed(messages) if m.role == "user"), "")


@dataclass(frozen=True)
class RouteClassifier:
    """P(the request needs the primary model) from its embedding (see the module docstring)."""

    weights: np.ndarray  # (dim,) float32
    bias: float
    threshold: float = 0.5
    version: str = "route-classifier-1"

    def probability(self, embedding: np.ndarray) -> float:
        """``embedding``: (dim,) float32, L2-normalised. Returns P(primary) in [0, 1]."""
        z = float(np.dot(self.weights, embedding) + self.bias)
        return float(1.0 / (1.0 + np.exp(-z)))

    def save(self, path: Path = ARTEFACT) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, weights=self.weights.astype(np.float32), bias=np.float32(self.bias), threshold=np.float32(self.threshold), version=np.str_(self.version))


@cache
def load_classifier(path: str = str(ARTEFACT)) -> RouteClassifier | None:
    """The committed classifier, or None when the file is missing (then only the heuristic routes)."""
    try:
        data = np.load(path)
    except OSError:
        return None
    return RouteClassifier(data["weights"].astype(np.float32), float(data["bias"]), float(data["threshold"]), str(data["version"]))


def fit(texts: list[str], primary: list[bool], embeddings: np.ndarray, c: float = 4.0) -> RouteClassifier:
    """Fit the classifier (scikit-learn's LogisticRegression: L2, ``C=c``, balanced classes) on ``embeddings``
    ((n, dim) float32) of ``texts`` labelled ``primary``. Raises ValueError with fewer than two classes."""
    from sklearn.linear_model import LogisticRegression

    if len(set(primary)) < 2 or len(texts) != len(embeddings):
        raise ValueError("need texts of both labels, one embedding each")
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(embeddings, np.array(primary))
    return RouteClassifier(model.coef_[0].astype(np.float32), float(model.intercept_[0]))


def read_labels(path: Path) -> list[tuple[str, bool]]:
    """``(prompt, needs primary)`` per line of a ``{"prompt": ..., "label": "small" | "primary"}`` JSON Lines file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["prompt"], r["label"] == "primary") for r in rows]


def main() -> None:
    """``python -m core.routing``: train on ``core/routing_labels.jsonl``, write ``core/models/route_classifier.npz``."""
    from core.embeddings import get_embedder

    rows = read_labels(LABELS)
    texts = [t for t, _ in rows]
    classifier = fit(texts, [y for _, y in rows], get_embedder().encode(texts))
    classifier.save()
    print(f"wrote {ARTEFACT} from {len(rows)} labelled prompts", file=sys.stderr)


if __name__ == "__main__":
    main()
