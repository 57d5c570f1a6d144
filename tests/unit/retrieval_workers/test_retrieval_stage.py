"""The retrieval stage on a real milvus-lite file: grounding, and skipping instead of stalling."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import Settings
from core.embeddings import get_embedder
from retrieval_workers.chunking import chunk_text
from retrieval_workers.store import KnowledgeBase
from retrieval_workers.worker import RetrievalStage
from schemas.events import ChatMessage, ChatTurnRequest, KbChunk, ReplyTo, SafetyVerdict, ScreenedTurn


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    store = KnowledgeBase(str(tmp_path_factory.mktemp("milvus") / "kb.db"), "test_chunks")
    text = (
        "Generators are functions that use yield to produce a sequence of values lazily. "
        "Each call to next() resumes the generator where it left off.\n\n"
        "Decorators wrap a function to extend its behaviour without changing its code."
    )
    chunks = chunk_text(text, "guide.md", size=120, overlap=20)
    vectors = get_embedder().encode([c.text for c in chunks])
    rows = [KbChunk(chunk_id=c.chunk_id, text=c.text, source=c.source, position=c.position, embedding=v.tolist()) for c, v in zip(chunks, vectors, strict=True)]
    assert store.upsert(rows) == len(rows)
    assert store.upsert(rows) == len(rows) and store.count() == len(rows)  # idempotent by content hash
    return store


def screened(question: str, embed: bool = True) -> ScreenedTurn:
    req = ChatTurnRequest(
        correlation_id="chatcmpl-r",
        conversation_id="conv-r",
        model="m",
        messages=[ChatMessage(role="user", content=question)],
        reply_to=ReplyTo(topic="chat.replies", partition=0),
    )
    vec = get_embedder().encode([question])[0].tolist() if embed else None
    return ScreenedTurn(
        correlation_id="chatcmpl-r",
        conversation_id="conv-r",
        request=req,
        verdict=SafetyVerdict(allowed=True, policy_version="t", latency_ms=0),
        query_embedding=vec,
    )


async def test_search_finds_the_relevant_passage(kb: KnowledgeBase, tmp_path: Path) -> None:
    stage = RetrievalStage(Settings(state_dir=tmp_path, retrieval_top_k=2), kb=kb, embedder=get_embedder())
    result = await stage.retrieve(screened("How does yield make a generator lazy?"))
    assert result.status == "ok" and result.passages
    assert "yield" in result.passages[0].text and result.passages[0].source == "guide.md"
    assert result.passages[0].score >= result.passages[-1].score
    # the embedding is computed here only when safety did not pass one along
    again = await stage.retrieve(screened("How does yield make a generator lazy?", embed=False))
    assert [p.chunk_id for p in again.passages] == [p.chunk_id for p in result.passages]


async def test_budget_exceeded_skips_with_the_reason(kb: KnowledgeBase, tmp_path: Path) -> None:
    # a budget spent before the search starts skips it (deterministic; a 1 µs budget used to race a fast search)
    stage = RetrievalStage(Settings(state_dir=tmp_path, retrieval_budget_ms=0), kb=kb, embedder=get_embedder())
    result = await stage.retrieve(screened("generators"))
    assert result.status == "skipped" and result.reason.startswith("timeout after")


async def test_store_failure_skips_with_the_reason(tmp_path: Path) -> None:
    broken = KnowledgeBase(str(tmp_path / "kb.db"), "gone")
    broken.client.drop_collection("gone")
    stage = RetrievalStage(Settings(state_dir=tmp_path), kb=broken, embedder=get_embedder())
    result = await stage.retrieve(screened("anything"))
    assert result.status == "skipped" and result.reason.startswith("error:")
    broken.close()
