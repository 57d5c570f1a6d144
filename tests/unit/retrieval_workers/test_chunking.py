"""Chunking (retrieval_workers.chunking)."""

from __future__ import annotations

import pytest

from retrieval_workers.chunking import chunk_text


def test_chunks_overlap_and_ids_are_content_hashes() -> None:
    text = " ".join(f"Sentence {i} talks about topic {i}." for i in range(120))
    a = chunk_text(text, "doc.md", size=300, overlap=60)
    b = chunk_text(text, "doc.md", size=300, overlap=60)
    assert [c.chunk_id for c in a] == [c.chunk_id for c in b]
    assert all(len(c.text) <= 300 for c in a) and len(a) > 5
    assert [c.position for c in a] == list(range(len(a)))
    # consecutive chunks share text (the overlap)
    assert a[1].text[:20] in a[0].text
    with pytest.raises(ValueError):
        chunk_text(text, "d", size=100, overlap=100)
