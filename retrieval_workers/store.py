"""The knowledge base in Milvus: one collection of chunks with their embeddings, source and position.

``uri`` is a local file path (milvus-lite, embedded; one process may open it: the retrieval worker) or
an ``http(s)://`` URI of a Milvus server — the code is the same. Vectors are L2-normalised
all-MiniLM-L6-v2 embeddings (384 floats); the metric is inner product, i.e. cosine similarity.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pymilvus import DataType, MilvusClient

from schemas.events import KbChunk, Passage

log = logging.getLogger(__name__)

MAX_TEXT = 8192
MAX_SOURCE = 1024


class KnowledgeBase:
    def __init__(self, uri: str, collection: str = "kb_chunks", dim: int = 384, index_type: str = "FLAT") -> None:
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(uri=uri)
        self.collection = collection
        self.dim = dim
        self.index_type = index_type
        self._ensure()

    def _ensure(self) -> None:
        if self.client.has_collection(self.collection):
            self.client.load_collection(self.collection)
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("chunk_id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE)
        schema.add_field("position", DataType.INT64)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        self.client.create_collection(self.collection, schema=schema, index_params=index)
        log.info("created Milvus collection %s (%s, IP, dim %d)", self.collection, self.index_type, self.dim)

    def upsert(self, chunks: list[KbChunk]) -> int:
        """Insert or replace chunks by ``chunk_id`` (a content hash): re-ingesting is idempotent."""
        if not chunks:
            return 0
        rows = [
            {
                "chunk_id": c.chunk_id,
                "vector": c.embedding,
                "text": c.text[:MAX_TEXT],
                "source": c.source[:MAX_SOURCE],
                "position": c.position,
            }
            for c in chunks
        ]
        self.client.upsert(self.collection, rows)
        return len(rows)

    def flush(self) -> None:
        """Seal what was upserted into segments (milvus-lite indexes sealed segments only; rows still in its
        memtable are searched by brute force in Python: ~10x slower at 435 chunks, seconds at 100k —
        ``bench/retrieval.py``)."""
        self.client.flush(self.collection)

    def search(self, vector: list[float], top_k: int = 4, min_score: float = -1.0) -> list[Passage]:
        """Top-``k`` passages by cosine similarity, best first, dropping those under ``min_score``."""
        hits = self.client.search(self.collection, data=[vector], limit=top_k, anns_field="vector", output_fields=["text", "source", "position"])[0]
        passages = []
        for h in hits:
            entity = h.get("entity", {})
            score = float(h.get("distance", 0.0))
            if score < min_score:
                continue
            passages.append(
                Passage(
                    chunk_id=str(h.get("chunk_id", h.get("id"))), text=entity["text"], source=entity["source"], position=int(entity["position"]), score=score
                )
            )
        return passages

    def count(self) -> int:
        res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    def close(self) -> None:
        self.client.close()
