"""The knowledge base in Milvus: one collection of chunks with a dense vector and a BM25 sparse vector each.

``uri`` is a local file path (milvus-lite, embedded; one process may open it: the retrieval worker) or
an ``http(s)://`` URI of a Milvus server — the code is the same.

Fields: ``vector`` — L2-normalised all-MiniLM-L6-v2 embedding of the chunk's indexed text (heading path, then
body; 384 floats, inner product = cosine); ``lexical`` — the same text as BM25 terms
(:func:`retrieval_workers.chunking.lexical_text`: identifiers split, Snowball-stemmed; milvus-lite's analyzer
ignores stemming filters, so terms are prepared here, identically for chunks and queries) turned into
``sparse`` by Milvus's built-in BM25 function; ``text`` (the body), ``title``, ``url``, ``anchor``,
``source``, ``position``, ``doc_hash`` (which version of the document the chunk belongs to).

Search modes (:meth:`KnowledgeBase.search`): ``dense`` (cosine), ``bm25`` (Milvus full-text search),
``hybrid`` — both in one Milvus ``hybrid_search`` fused by reciprocal-rank fusion, score
``Σ 1/(k + rank)`` with k = 60 (Cormack, Clarke & Büttcher, SIGIR 2009) — and ``auto`` (the default):
hybrid where BM25 helps, dense where it does not. A query with identifier-like tokens (:func:`identifiers`)
is searched hybrid with BM25 over those tokens only (exact rare names are what dense vectors miss); a query
of at most three words hybrid with all its words; a natural-language question dense only (on the dev split
of ``bench/data/retrieval_questions.jsonl`` fusing BM25 into such questions lowered MRR, and milvus-lite's
BM25 costs ~60 ms for a 9-term query against ~18 ms for dense). Then at most ``per_page`` chunks per
source, so the top-k spans several pages. A query whose best dense cosine is under ``min_score`` gets no
passages (nothing in the knowledge base is about it).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, MilvusClient, RRFRanker

from retrieval_workers.chunking import lexical_text
from schemas.events import KbChunk, Passage

log = logging.getLogger(__name__)

MAX_TEXT = 8192
MAX_LEXICAL = 16384
MAX_SOURCE = 1024
MAX_TITLE = 512
MAX_URL = 2048
RRF_K = 60
SearchMode = Literal["auto", "dense", "bm25", "hybrid"]
MODES: tuple[SearchMode, ...] = ("auto", "dense", "bm25", "hybrid")
# identifier-like tokens: `code`, dotted names, snake_case, calls, CamelCase, --options, dunders
_IDENTIFIER = re.compile(
    r"`[^`]+`|\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|\b\w+_\w+|\b\w+\(\)|\b[a-z]+[A-Z]\w*|\b[A-Z][a-z0-9]+[A-Z]\w*|(?<!\w)--?[a-z][\w-]+|\b[A-Z]{3,}\w*"
)


def identifiers(query: str) -> list[str]:
    """The identifier-like tokens of ``query`` (``os.path.join``, ``dirs_exist_ok``, ``--user``, ``PYTHONPATH``)."""
    return [m.group(0).strip("`") for m in _IDENTIFIER.finditer(query)]


_OUTPUT = ["text", "source", "position", "title", "url", "anchor"]
# Reranks (query, [passage texts]) -> one score per passage, higher is better.
Reranker = Callable[[str, list[str]], list[float]]


def _cut(value: str, limit: int) -> str:
    """``value`` within ``limit`` UTF-8 bytes (Milvus VARCHAR lengths count bytes)."""
    data = value.encode()
    return value if len(data) <= limit else data[:limit].decode(errors="ignore")


class KnowledgeBase:
    def __init__(self, uri: str, collection: str = "kb_hybrid", dim: int = 384, index_type: str = "FLAT") -> None:
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
        schema.add_field("lexical", DataType.VARCHAR, max_length=MAX_LEXICAL, enable_analyzer=True)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("source", DataType.VARCHAR, max_length=MAX_SOURCE)
        schema.add_field("position", DataType.INT64)
        schema.add_field("title", DataType.VARCHAR, max_length=MAX_TITLE)
        schema.add_field("url", DataType.VARCHAR, max_length=MAX_URL)
        schema.add_field("anchor", DataType.VARCHAR, max_length=MAX_TITLE)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["lexical"], output_field_names=["sparse"]))
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.client.create_collection(self.collection, schema=schema, index_params=index)
        log.info("created Milvus collection %s (%s IP dim %d + BM25)", self.collection, self.index_type, self.dim)

    def upsert(self, chunks: list[KbChunk]) -> int:
        """Insert or replace chunks by ``chunk_id`` (a content hash): re-ingesting is idempotent."""
        if not chunks:
            return 0
        rows = [
            {
                "chunk_id": c.chunk_id,
                "vector": c.embedding,
                "lexical": _cut(lexical_text(" ".join([*c.heading_path, c.text])), MAX_LEXICAL),
                "text": _cut(c.text, MAX_TEXT),
                "source": _cut(c.source, MAX_SOURCE),
                "position": c.position,
                "title": _cut(c.title, MAX_TITLE),
                "url": _cut(c.url, MAX_URL),
                "anchor": _cut(c.anchor, MAX_TITLE),
                "doc_hash": c.doc_hash[:64],
            }
            for c in chunks
        ]
        self.client.upsert(self.collection, rows)
        return len(rows)

    def delete_source(self, source: str, keep_hash: str | None = None) -> None:
        """Delete every chunk of ``source`` (or, with ``keep_hash``, those of any other version)."""
        where = f"source == {_literal(source)}"
        if keep_hash is not None:
            where += f" and doc_hash != {_literal(keep_hash)}"
        self.client.delete(self.collection, filter=where)

    def flush(self) -> None:
        """Seal what was upserted into segments (milvus-lite indexes sealed segments only; rows still in its
        memtable are searched by brute force in Python: ~10x slower at 435 chunks, seconds at 100k —
        ``bench/retrieval.py``)."""
        self.client.flush(self.collection)

    def search(
        self,
        vector: list[float],
        top_k: int = 4,
        min_score: float = -1.0,
        *,
        query: str = "",
        mode: SearchMode = "auto",
        per_page: int = 0,
        candidates: int = 40,
        reranker: Reranker | None = None,
    ) -> list[Passage]:
        """The ``top_k`` best passages for a query, best first (see the module docstring for the modes).

        ``vector``: the query's embedding (384 floats, L2-normalised); ``query``: its text (BM25 needs it;
        without it ``hybrid`` is ``dense``). ``per_page``: at most that many chunks of one source (0: no
        limit). ``candidates``: how many hits each retriever returns before fusion, the page limit and the
        ``reranker`` (which reorders them). Raises pymilvus' ``MilvusException`` when Milvus fails."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {', '.join(MODES)}")
        terms = lexical_text(query) if query else ""
        if mode == "auto":
            names = identifiers(query)
            if names:
                mode, terms = "hybrid", lexical_text(" ".join(names))
            else:
                mode = "hybrid" if 0 < len(query.split()) <= 3 else "dense"
        if not terms and mode != "dense":
            mode = "dense"
        limit = max(candidates, top_k)
        dense_hits: list[dict[str, Any]] = []
        if mode != "bm25":
            dense_hits = self._search("vector", vector, limit if mode == "dense" else 1)
            if not dense_hits or float(dense_hits[0].get("distance", 0.0)) < min_score:
                return []
        if mode == "dense":
            hits = dense_hits
        elif mode == "bm25":
            hits = self._search("sparse", terms, limit)
        else:
            requests = [
                AnnSearchRequest(data=[vector], anns_field="vector", param={"metric_type": "IP"}, limit=limit),
                AnnSearchRequest(data=[terms], anns_field="sparse", param={"metric_type": "BM25"}, limit=limit),
            ]
            hits = list(self.client.hybrid_search(self.collection, requests, ranker=RRFRanker(RRF_K), limit=limit, output_fields=_OUTPUT)[0])
        passages = [_passage(h) for h in hits]
        if mode == "bm25":  # milvus-lite reports BM25 as a negative distance; a higher BM25 score is better
            passages = [p.model_copy(update={"score": abs(p.score)}) for p in passages]
        if reranker is not None and passages:
            scores = reranker(query, [f"{p.title}\n{p.text}" for p in passages])
            passages = [p.model_copy(update={"score": float(s)}) for s, p in sorted(zip(scores, passages, strict=True), key=lambda sp: -sp[0])]
        return _limit_per_page(passages, top_k, per_page)

    def _search(self, field: str, data: Any, limit: int) -> list[dict[str, Any]]:
        params = {"metric_type": "IP" if field == "vector" else "BM25"}
        return list(self.client.search(self.collection, data=[data], limit=limit, anns_field=field, search_params=params, output_fields=_OUTPUT)[0])

    def count(self, source: str | None = None) -> int:
        if source is None:
            res = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        else:
            res = self.client.query(self.collection, filter=f"source == {_literal(source)}", output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    def close(self) -> None:
        self.client.close()


def _literal(value: str) -> str:
    """A string literal for a Milvus boolean expression (double-quoted, backslash escapes; milvus-lite does not
    take ``filter_params`` templates)."""
    return json.dumps(value, ensure_ascii=False)


def _passage(hit: dict[str, Any]) -> Passage:
    entity = hit.get("entity", {})
    return Passage(
        chunk_id=str(hit.get("chunk_id", hit.get("id"))),
        text=entity["text"],
        source=entity["source"],
        position=int(entity["position"]),
        score=float(hit.get("distance", 0.0)),
        title=entity.get("title") or "",
        url=entity.get("url") or "",
        anchor=entity.get("anchor") or "",
    )


def _limit_per_page(passages: list[Passage], top_k: int, per_page: int) -> list[Passage]:
    """The first ``top_k`` passages with at most ``per_page`` of any one source (0: no limit)."""
    out: list[Passage] = []
    seen: dict[str, int] = {}
    for p in passages:
        if per_page and seen.get(p.source, 0) >= per_page:
            continue
        seen[p.source] = seen.get(p.source, 0) + 1
        out.append(p)
        if len(out) == top_k:
            break
    return out
