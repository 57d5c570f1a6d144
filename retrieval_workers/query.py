"""The retrieval query of a conversation turn, and the optional cross-encoder reranker.

:func:`standalone_query` — a follow-up such as "and for writing?" or "does it work on bytes too?" means
nothing to a search engine alone. Cheap heuristics (no model call) decide whether the last user message
reads as a follow-up: it opens with a connective ("and", "what about", "how about", "also", "same for", …),
or it is short (≤ 6 words) and leans on the context (a pronoun such as "it", "that", "them", or no word a
search could use). A follow-up is searched together with the previous user message (the topic it continues);
a standalone question is searched as it is. Measured on the follow-up questions of
``bench/data/retrieval_questions.jsonl`` by ``bench/retrieval_quality.py`` (numbers in README).

:func:`load_reranker` — ``CHATBUS_RERANKER``: any sentence-transformers ``CrossEncoder`` (a Hugging Face id
or a local path); it scores (query, passage) pairs and reorders the fused candidates. None ships offline
here, so the default is none.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache

from retrieval_workers.store import Reranker
from schemas.events import ChatMessage

log = logging.getLogger(__name__)

_CONNECTIVES = re.compile(
    r"^\s*(and|or|but|also|then|so|ok(ay)?|now|what about|how about|same (for|with)|what if|and if|why not|instead|"
    r"(does|do|can|will|would|is|are|should) (it|that|this|they|those|these|i do (it|that)))\b",
    re.IGNORECASE,
)
_PRONOUNS = re.compile(r"\b(it|its|that|this|those|these|them|they|one|ones|there|same|above|previous|instead)\b", re.IGNORECASE)
_WORDS = re.compile(r"[A-Za-z0-9_.]+")
_STOP = {
    "how",
    "what",
    "why",
    "when",
    "do",
    "does",
    "i",
    "you",
    "can",
    "the",
    "a",
    "an",
    "to",
    "for",
    "of",
    "in",
    "on",
    "with",
    "is",
    "are",
    "and",
    "or",
    "about",
}


def is_follow_up(text: str) -> bool:
    """Whether ``text`` reads as continuing an earlier question (see the module docstring)."""
    words = _WORDS.findall(text)
    if _CONNECTIVES.match(text):
        return True
    if len(words) <= 6 and (_PRONOUNS.search(text) or not [w for w in words if w.lower() not in _STOP]):
        return True
    return False


def standalone_query(messages: list[ChatMessage], *, history_turns: int = 1) -> tuple[str, bool]:
    """``(query, rewritten)``: the last user message, or — for a follow-up — the previous ``history_turns``
    user messages and it, joined (oldest first)."""
    users = [m.content for m in messages if m.role == "user" and isinstance(m.content, str) and m.content.strip()]
    if not users:
        return "", False
    last = users[-1].strip()
    if len(users) < 2 or not is_follow_up(last):
        return last, False
    earlier = users[-1 - history_turns : -1]
    return " ".join([*(u.strip() for u in earlier), last]), True


@lru_cache(maxsize=2)
def load_reranker(name: str) -> Reranker:
    """A reranker over sentence-transformers' ``CrossEncoder(name)``: ``(query, texts) -> scores`` (higher is
    better). Raises ``OSError`` when the model cannot be found (offline here: a local path only)."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(name, device="cpu")
    lock = threading.Lock()
    log.info("reranker loaded: %s", name)

    def rerank(query: str, texts: list[str]) -> list[float]:
        with lock:
            scores = model.predict([(query, t) for t in texts], show_progress_bar=False)
        return [float(s) for s in scores]

    return rerank
