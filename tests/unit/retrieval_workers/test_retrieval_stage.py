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


def test_hybrid_search_finds_a_rare_identifier_that_dense_search_ranks_below_a_similar_name(tmp_path: Path) -> None:
    """Real documentation pages on a real milvus-lite file: BM25 matches the exact API name, RRF puts it first."""
    from chatbus.commands.stack import DOCS_BASE_URL, docs_root
    from retrieval_workers.ingest import collect_chunks

    root = docs_root()
    if root is None:
        pytest.fail("the Python documentation is not unpacked: run `make setup` (make docs-corpus)")
    pages = [root / "library" / f"{p}.html" for p in ("functools", "bisect", "heapq")]
    chunks = collect_chunks(pages, Settings(), base_url=DOCS_BASE_URL, url_root=root)
    vectors = get_embedder(bulk=True).encode([c.indexed_text for c in chunks])
    store = KnowledgeBase(str(tmp_path / "kb.db"), "docs")
    store.upsert(
        [
            KbChunk(chunk_id=c.chunk_id, text=c.text, source=c.source, position=c.position, embedding=v.tolist(), title=c.title, anchor=c.anchor, url=c.url)
            for c, v in zip(chunks, vectors, strict=True)
        ]
    )
    store.flush()
    query = "singledispatchmethod"
    vector = get_embedder().encode([query])[0].tolist()
    dense = store.search(vector, 4, query=query, mode="dense")
    hybrid = store.search(vector, 4, query=query, mode="auto", per_page=2)
    assert hybrid[0].anchor == "functools.singledispatchmethod", [p.anchor for p in hybrid]
    assert hybrid[0].url == f"{DOCS_BASE_URL}library/functools.html#functools.singledispatchmethod"
    assert hybrid[0].title == "functools — Higher-order functions and operations on callable objects › functools.singledispatchmethod"
    assert dense[0].anchor != "functools.singledispatchmethod", "dense alone ranks a similar name first"
    assert len(hybrid) <= 4 and max(sum(1 for p in hybrid if p.source == s) for s in {p.source for p in hybrid}) <= 2
