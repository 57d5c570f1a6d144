"""The semantic cache's store on milvus-lite (a real local file) with the packaged embedder, and its guard."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from core.embeddings import get_embedder
from core.semantic_guard import conflict
from retrieval_workers.semantic_cache import SemanticCache
from retrieval_workers.store import KnowledgeBase
from schemas.events import CacheEntry


def entry(question: str, answer: str, tenant: str = "t1", expires_in: float = 3600) -> CacheEntry:
    return CacheEntry(
        correlation_id="c",
        conversation_id="v",
        tenant=tenant,
        model="m",
        system="",
        question=question,
        answer=answer,
        finish_reason="stop",
        prompt_tokens=9,
        completion_tokens=3,
        expires_at=time.time() + expires_in,
    )


@pytest.fixture()
def cache(tmp_path: Path) -> SemanticCache:
    return SemanticCache(KnowledgeBase(str(tmp_path / "kb.db"), "chunks").client)


def test_the_nearest_live_entry_of_the_same_tenant_is_found(cache: SemanticCache) -> None:
    embed = get_embedder()

    def vec(text: str) -> list[float]:
        return [float(x) for x in embed.encode([text])[0]]

    cache.put(entry("How do I reverse a list in Python?", "Use reversed() or list.reverse()."), vec("How do I reverse a list in Python?"))
    cache.put(entry("What is the capital of France?", "Paris.", tenant="t2"), vec("What is the capital of France?"))
    cache.put(entry("How do I sort a dict by value?", "sorted(d.items(), key=...)", expires_in=-1), vec("How do I sort a dict by value?"))
    found = cache.nearest(vec("What's the way to reverse a Python list?"), "t1", "m", "")
    assert found is not None and found[0] > 0.8 and found[1].text == "Use reversed() or list.reverse()." and found[1].prompt_tokens == 9
    other = cache.nearest(vec("What is the capital of France?"), "t1", "m", "")
    assert other is None or other[1].text != "Paris."  # another tenant's answer is never found
    assert cache.nearest(vec("How do I sort a dict by value?"), "t3", "m", "") is None  # expired, and another tenant's
    cache.clear()
    assert cache.nearest(vec("How do I reverse a list in Python?"), "t1", "m", "") is None


@pytest.mark.parametrize(
    ("new", "cached", "why"),
    [
        ("How do I disable dark mode?", "How do I enable dark mode?", "opposite"),
        ("Why doesn't my code work?", "Why does my code work?", "negation"),
        ("What is 15% of 200?", "What is 25% of 200?", "number"),
        ("How do I convert an int to a string?", "How do I convert a string to an int?", "direction"),
        ("How do I reverse a list in JavaScript?", "How do I reverse a list in Python?", "entity"),
        ("What's the way to reverse a Python list?", "How do I reverse a list in Python?", None),
    ],
)
def test_the_guard_names_what_makes_a_cached_answer_wrong(new: str, cached: str, why: str | None) -> None:
    assert conflict(new, cached) == why
