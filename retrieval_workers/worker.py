"""Retrieval worker: grounds each screened turn in the knowledge base, and owns the Milvus collection.

Two consumer groups in one process (milvus-lite may be opened by one process only):

* ``chatbus-retrieval`` on ``chat.screened`` (and the batch lane ``batch.screened`` → ``batch.grounded``
  when no interactive turn waits; lines of a cancelled batch finish at once as ``cancelled``): the query
  (the last user message, or a follow-up joined with the previous one: :mod:`retrieval_workers.query`),
  hybrid top-k search (:mod:`retrieval_workers.store`) with the query embedding the safety stage computed
  (embedding again only for a rewritten query or when it is missing), the optional reranker, prompt
  assembly with numbered, titled citations, then ``chat.grounded``. If the search fails or exceeds ``CHATBUS_RETRIEVAL_BUDGET_MS``, the turn goes on
  with ``retrieval.status="skipped"`` and the reason instead of stalling.
* ``chatbus-retrieval-ingest`` on ``kb.ingest``: upserts embedded chunks (idempotent by content hash);
  after a document's last part deletes its older version's chunks and publishes the document on the
  compacted ``kb.sources``; deletes a document on request.

Both are at-least-once (:mod:`consumers.stage`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from aiokafka import ConsumerRecord

from consumers.cancellations import CancelledBatches
from consumers.gate import DownstreamGate
from consumers.stage import StageWorker
from core import metrics
from core.cache_rules import first_question, models_on, not_cacheable, tenant_of
from core.config import Settings
from core.embeddings import TextEmbedder, get_embedder
from core.grounding import assemble
from core.semantic_guard import conflict
from producers.bus import Outgoing
from producers.replies import whole_reply
from retrieval_workers.query import load_reranker, standalone_query
from retrieval_workers.semantic_cache import SemanticCache
from retrieval_workers.store import KnowledgeBase
from schemas.events import AnyEvent, CachedReply, CacheEntry, Citation, GroundedTurn, KbIngest, KbSource, RetrievalResult, ScreenedTurn, last_user_text
from topics.pools import pool_named, primary
from topics.registry import BATCH_GROUNDED, CHAT_SCREENED, INFERENCE, KB_SOURCES, RETRIEVAL, RETRIEVAL_INGEST, topic

log = logging.getLogger(__name__)


class RetrievalStage:
    def __init__(self, settings: Settings, kb: KnowledgeBase | None = None, embedder: TextEmbedder | None = None) -> None:
        self.settings = settings
        self.kb = kb or KnowledgeBase(settings.resolved_milvus_uri, settings.milvus_collection)
        self._embedder = embedder
        self.milvus = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus")  # one caller at a time
        self.semantic = SemanticCache(self.kb.client, self.kb.dim) if settings.semantic_cache_models else None
        self.unflushed_since = 0.0  # monotonic time of the first upsert not yet flushed (0: none)
        self.last_upsert = 0.0
        self.cancelled = CancelledBatches(settings)

    @property
    def embedder(self) -> TextEmbedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.settings.embedding_model, self.settings.embedding_backend)
        return self._embedder

    async def retrieve(self, turn: ScreenedTurn) -> RetrievalResult:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        budget = self.settings.retrieval_budget_ms / 1000
        s = self.settings
        try:
            query, rewritten = standalone_query(turn.request.messages) if s.query_rewrite else (last_user_text(turn.request.messages), False)
            vector = None if rewritten else turn.query_embedding
            if vector is None:
                vector = (await asyncio.wait_for(asyncio.to_thread(self.embedder.encode, [query]), budget))[0].tolist()
            remaining = budget - (time.perf_counter() - t0)
            if remaining <= 0:  # the embedding used the whole budget: no search at all
                raise TimeoutError
            reranker = await loop.run_in_executor(self.milvus, load_reranker, s.reranker) if s.reranker else None  # loaded once, off the loop
            search = loop.run_in_executor(
                self.milvus,
                functools.partial(
                    self.kb.search,
                    vector,
                    s.retrieval_top_k,
                    s.retrieval_min_score,
                    query=query,
                    mode=s.retrieval_mode,
                    per_page=s.retrieval_per_page,
                    candidates=s.reranker_candidates if reranker else s.retrieval_candidates,
                    reranker=reranker,
                ),
            )
            passages = await asyncio.wait_for(search, remaining)
        except TimeoutError:
            metrics.RETRIEVAL_SKIPPED.labels("timeout").inc()
            return RetrievalResult(status="skipped", reason=f"timeout after {self.settings.retrieval_budget_ms:.0f} ms", latency_ms=_ms(t0))
        except Exception as exc:  # Milvus down, collection missing …: answer without sources
            log.warning("retrieval failed for %s: %s", turn.correlation_id, exc)
            metrics.RETRIEVAL_SKIPPED.labels("error").inc()
            return RetrievalResult(status="skipped", reason=f"error: {type(exc).__name__}: {exc}"[:500], latency_ms=_ms(t0))
        metrics.RETRIEVAL_SECONDS.observe(time.perf_counter() - t0)
        metrics.RETRIEVAL_HITS.observe(len(passages))
        return RetrievalResult(status="ok", passages=passages, latency_ms=_ms(t0), query=query if rewritten else "")

    async def handle_turn(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        if not isinstance(event, ScreenedTurn):
            raise TypeError(f"unexpected {event.event_type} on {record.topic}")
        if event.request in self.cancelled:
            return whole_reply(event.request, "", "cancelled", event.request.model, stages=event.stages, verdict=event.verdict)
        event.mark("retrieval_start")
        cached = await self.semantic_hit(event)
        citations: list[Citation]
        if cached is not None:  # the inference worker streams it; no search, no prompt
            result, prompt, citations = RetrievalResult(status="skipped", reason="semantic cache hit"), list(event.request.messages), []
        else:
            result = await self.retrieve(event)
            prompt, citations = assemble(event.request.messages, result.passages, self.settings.grounding_placement)
        event.mark("retrieval_end")
        grounded = GroundedTurn(
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            stages=dict(event.stages),
            request=event.request,
            verdict=event.verdict,
            retrieval=result,
            prompt_messages=prompt,
            citations=citations,
            cached=cached,
        )
        pool = pool_named(self.settings, event.request.model) or primary(self.settings)  # the model the edge chose (topics.pools)
        out_topic = topic(pool.grounded(event.request.source), self.settings.topic_prefix)
        key = grounded.key if self.settings.conversation_affinity else grounded.correlation_id.encode()  # prefix-cache affinity
        return [Outgoing(out_topic, grounded.to_bytes(), key=key)]

    async def semantic_hit(self, turn: ScreenedTurn) -> CachedReply | None:
        """The semantic cache's answer for a conversation's first question (retrieval_workers.semantic_cache), or None."""
        request = turn.request
        if self.semantic is None or not models_on(self.settings.semantic_cache_models, request.model) or not_cacheable(request, turn.verdict):
            return None
        first = first_question(request)
        if first is None:
            return None
        question, system = first
        loop = asyncio.get_running_loop()
        try:
            vector = turn.query_embedding or (await asyncio.to_thread(self.embedder.encode, [question]))[0].tolist()
            found = await asyncio.wait_for(loop.run_in_executor(self.milvus, self.semantic.nearest, vector, tenant_of(request), request.model, system), 1.0)
        except Exception as exc:  # the cache is an optimisation: a failed lookup is a miss
            log.warning("semantic cache lookup failed: %s: %s", type(exc).__name__, exc)
            metrics.RESPONSE_CACHE.labels("semantic", "unavailable").inc()
            return None
        if found is None or found[0] < self.settings.semantic_cache_threshold:
            metrics.RESPONSE_CACHE.labels("semantic", "miss").inc()
            log.debug("semantic cache miss for %s (nearest %s)", turn.correlation_id, None if found is None else round(found[0], 3))
            return None
        reason = conflict(question, found[1].question)
        if reason is not None:
            metrics.RESPONSE_CACHE.labels("semantic", f"guard_{reason}").inc()
            log.info("semantic cache: %.3f close, refused by the guard (%s)", found[0], reason)
            return None
        metrics.RESPONSE_CACHE.labels("semantic", "hit").inc()
        return found[1]

    async def handle_ingest(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        if isinstance(event, CacheEntry):
            if self.semantic is not None:
                vector = (await asyncio.to_thread(self.embedder.encode, [event.question]))[0].tolist()
                await asyncio.get_running_loop().run_in_executor(self.milvus, self.semantic.put, event, vector)
                metrics.RESPONSE_CACHE.labels("semantic", "stored").inc()
                log.info("semantic cache: stored an answer of %s", event.model)
            return []
        if not isinstance(event, KbIngest):
            raise TypeError(f"unexpected {event.event_type} on {record.topic}")
        loop = asyncio.get_running_loop()
        if self.semantic is not None:  # an answer may rest on passages that change now
            await loop.run_in_executor(self.milvus, self.semantic.clear)
        sources = topic(KB_SOURCES, self.settings.topic_prefix)
        if event.op == "delete":
            if not event.source:
                raise ValueError("kb.ingest delete without a source")
            await loop.run_in_executor(self.milvus, self.kb.delete_source, event.source)
            log.info("deleted %s from the knowledge base", event.source)
            self.unflushed_since = self.unflushed_since or time.monotonic()
            return [Outgoing(sources, None, key=event.source.encode())]
        n = await loop.run_in_executor(self.milvus, self.kb.upsert, event.chunks)
        self.unflushed_since = self.unflushed_since or time.monotonic()
        self.last_upsert = time.monotonic()
        log.info("upserted %d chunks%s", n, f" of {event.source} ({event.part + 1}/{event.parts})" if event.source else "")
        if not event.source or event.part != event.parts - 1:
            return []
        # the document's last part: drop an older version's chunks, then say what the knowledge base holds
        await loop.run_in_executor(self.milvus, self.kb.delete_source, event.source, event.doc_hash)
        chunks = await loop.run_in_executor(self.milvus, self.kb.count, event.source)
        url = event.chunks[0].url.split("#", 1)[0] if event.chunks else ""
        entry = KbSource(source=event.source, doc_hash=event.doc_hash, title=event.title, chunks=chunks, url=url)
        return [Outgoing(sources, entry.to_bytes(), key=event.source.encode())]

    async def seal_when_idle(self, stop: asyncio.Event, idle_s: float = 2.0) -> None:
        """Flush upserted chunks once ingestion pauses for ``idle_s`` (or after 30 s of steady ingest), so
        searches run on indexed, sealed segments instead of milvus-lite's brute-force memtable."""
        while not stop.is_set():
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self.unflushed_since and (now - self.last_upsert >= idle_s or now - self.unflushed_since >= 30.0):
                self.unflushed_since = 0.0
                try:
                    await asyncio.get_running_loop().run_in_executor(self.milvus, self.kb.flush)
                    log.info("knowledge base flushed (sealed for indexed search)")
                except Exception as exc:  # searching unsealed rows still works, only slower
                    log.warning("knowledge base flush failed: %s", exc)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    stage = RetrievalStage(settings)
    turns = StageWorker(
        settings,
        "retrieval",
        RETRIEVAL.group_id,
        RETRIEVAL.topics,
        stage.handle_turn,
        priority_topics=(CHAT_SCREENED,),
        low_priority_gate=DownstreamGate(settings, BATCH_GROUNDED, INFERENCE.group_id, high=2 * settings.max_inflight_turns),
        companions=(stage.cancelled,),
    )
    ingest = StageWorker(settings, "retrieval-ingest", RETRIEVAL_INGEST.group_id, RETRIEVAL_INGEST.topics, stage.handle_ingest, max_records=8)
    try:
        # one failing loop ends the other and the process (so a supervisor restarts it), not half of it
        async with asyncio.TaskGroup() as group:
            group.create_task(turns.run(stop))
            group.create_task(ingest.run(stop))
            group.create_task(stage.seal_when_idle(stop))
    finally:
        stage.kb.close()
