"""Follow-up detection and the standalone query (retrieval_workers.query)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_workers.query import is_follow_up, load_reranker, standalone_query
from schemas.events import ChatMessage


@pytest.mark.parametrize(
    "text",
    [
        "and for the keys?",
        "What about sets?",
        "how about in reverse order",
        "does it work with bytes too?",
        "Same for tuples",
        "why?",
        "and then?",
        "can it be nested",
    ],
)
def test_follow_ups(text: str) -> None:
    assert is_follow_up(text)


@pytest.mark.parametrize(
    "text",
    [
        "How do I sort a dictionary by its values?",
        "what is a context manager",
        "itertools.groupby example",
        "How can I measure the execution time of a small snippet of code?",
        "dataclass frozen",
    ],
)
def test_standalone_questions(text: str) -> None:
    assert not is_follow_up(text)


def test_standalone_query_joins_a_follow_up_with_the_previous_user_turn() -> None:
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="How do I compress a file with gzip?"),
        ChatMessage(role="assistant", content="Use gzip.open."),
    ]
    assert standalone_query([*history, ChatMessage(role="user", content="and to decompress it?")]) == (
        "How do I compress a file with gzip? and to decompress it?",
        True,
    )
    assert standalone_query([*history, ChatMessage(role="user", content="How do I read a TOML file?")]) == ("How do I read a TOML file?", False)
    assert standalone_query([ChatMessage(role="user", content="and for writing?")]) == ("and for writing?", False)  # nothing to join
    assert standalone_query([]) == ("", False)


def test_a_configured_cross_encoder_reorders_the_candidates(tmp_path: Path) -> None:
    """CHATBUS_RERANKER's path: a cross-encoder saved locally (random tiny weights, built here: its scores are
    noise, only the wiring is checked) loads by path and reorders a real milvus-lite search by its scores."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from core.embeddings import default_model_path, get_embedder
    from retrieval_workers.store import KnowledgeBase
    from schemas.events import KbChunk

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")
    rerank = load_reranker(str(tmp_path / "ce"))

    texts = [f"Note {i}: the heron stands in water number {i} and waits for fish." for i in range(8)]
    vectors = get_embedder().encode(texts)
    kb = KnowledgeBase(str(tmp_path / "kb.db"), "rerank")
    kb.upsert(
        [KbChunk(chunk_id=f"c{i}", text=t, source=f"n{i}.md", position=0, embedding=v.tolist()) for i, (t, v) in enumerate(zip(texts, vectors, strict=True))]
    )
    query = "what does the heron wait for"
    qv = get_embedder().encode([query])[0].tolist()
    plain = kb.search(qv, 8, query=query, mode="dense")
    reranked = kb.search(qv, 8, query=query, mode="dense", reranker=rerank)
    assert {p.chunk_id for p in reranked} == {p.chunk_id for p in plain}
    expected = rerank(query, [f"{p.title}\n{p.text}" for p in plain])
    assert [p.score for p in reranked] == sorted(expected, reverse=True)
    assert reranked[0].chunk_id == plain[max(range(len(plain)), key=lambda i: expected[i])].chunk_id
