"""Inference worker: generates grounded turns and streams token events to each turn's ``reply_to``.

Consumer group ``chatbus-inference`` on ``chat.grounded``. Guarantee: **at-least-once per turn** — a
request's offset is committed only after the turn's final event (``TurnCompleted``) is acknowledged
by the broker, and offsets are committed in order per partition (:class:`OffsetTracker`), so a worker
that dies mid-stream leaves the turn to be redelivered to another member of the group. A redelivered
turn is a new *attempt*: it regenerates with the same seed (derived from the correlation id when the
client gave none) and its token events carry ``text_offset``, so the edge splices it without repeating
text already shown.

Broker outages: a broker that does not acknowledge a send is an outage, not the turn's fault. Token
events go out one at a time through :class:`producers.replies.ReplySender`, which retries from the last
acknowledged character (the client's stream pauses and resumes, with nothing lost or repeated); the
completion is retried until acknowledged (:func:`producers.replies.produce_retrying`) and only then is the
turn committed. Nothing is dead-lettered for an outage; a worker stopped meanwhile leaves the turn
uncommitted, so it is redone.

Backpressure: at most ``CHATBUS_MAX_INFLIGHT_TURNS`` turns run at once; when full, the worker pauses
its partitions (heartbeats go on, nothing more is fetched) and resumes when a turn finishes.

Priority: the group reads ``chat.grounded`` (interactive) and ``batch.grounded`` (the batch lane).
Interactive records are fetched first whenever any wait; batch turns are admitted only while fewer
than ``max_inflight_turns - interactive_reserve`` turns run (batch partitions are paused otherwise),
so batch work fills idle capacity and an interactive turn always finds a free slot. Batch turns
produce no token events, only their completion on ``batch.results``; lines of a cancelled batch
(``batch.jobs``) are aborted or finished at once as ``cancelled``.

Rebalances: turns keep running while the group rebalances; only turns whose partition went to
another member are stopped (uncommitted, so the new owner redoes them). Records refetched after a
partition comes back are recognised by offset and not run twice.

Output rail (``CHATBUS_OUTPUT_RAIL``, on by default; :mod:`core.safety.output`): the answer is screened
while it streams — at each sentence end or every ``output_rail_every_tokens`` tokens, in a thread while
generation goes on — and text reaches the reply topic only once a screen has allowed it (plus at most
``output_rail_window_tokens`` unscreened tokens), PII-masked. On a violation generation is aborted and
the attempt's completion is a retraction (``finish_reason="content_filter"``, ``retraction`` set, the
safety message as its text); the withdrawn answer travels only PII-masked, for review.

Cancellation: every worker reads all of ``chat.control`` (no consumer group, from ten minutes back, so a
worker that was down or restarted still sees recent cancels); a cancel for a running turn aborts it in the
engine and completes it with ``finish_reason="cancelled"``; a cancel for a turn not yet dequeued is
remembered for ten minutes. Edges beat on ``chat.control`` every ``edge_heartbeat_s``
(:class:`schemas.events.EdgeHeartbeat`): a turn whose edge stopped beating ``edge_timeout_s`` ago, and
that no live edge streams to a resumed client, is cancelled (``edge_gone``) — running or on dequeue — and
an interactive turn dequeued more than ``turn_timeout_s`` after it was published (its client has had its
504) is not started (``expired``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from consumers.cancellations import CANCEL_MEMORY_S, CancelledBatches, ControlTail
from consumers.runtime import ConsumerRuntime, OffsetTracker
from core import metrics
from core.cache_rules import first_question, models_on, not_cacheable, tenant_of
from core.config import Settings
from core.safety.output import SAFETY_MESSAGE, OutputRail, OutputScreen, OutputVerdict
from core.tools import INVALID_TOOL_CALL, InvalidToolCall, ToolCallStream, check_calls, forced_prefix
from inference_workers.engines import Engine, GenerationRequest, make_engine
from inference_workers.fair import FairSlots
from inference_workers.prompt_budget import fit_grounded, prompt_budget
from inference_workers.response_cache import CachedAnswer, ResponseCache, cache_key, cacheable
from producers.bus import Outgoing
from producers.replies import ReplySender, completion, produce_retrying, to_reply
from schemas.events import (
    CacheEntry,
    ChatTurnRequest,
    DecodeError,
    EdgeHeartbeat,
    FinishReason,
    GroundedTurn,
    Retraction,
    ReviewItem,
    ToolCall,
    TurnCompleted,
    Usage,
    new_id,
)
from topics.pools import ModelPool, pool_named, primary
from topics.registry import CACHE_ENTRIES, CHAT_CONTROL, SAFETY_REVIEW, topic

__all__ = ["InferenceWorker", "OffsetTracker", "derived_seed", "observe_turn", "run"]

log = logging.getLogger(__name__)

ENGINE_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


def derived_seed(correlation_id: str) -> int:
    """A stable seed per turn, so a redelivered attempt samples the same tokens (same model and hardware)."""
    return int(hashlib.sha256(correlation_id.encode()).hexdigest()[:8], 16)


@dataclass
class Running:
    task: asyncio.Task[None]
    tp: TopicPartition
    offset: int
    batch_id: str | None = None
    reply_partition: int | None = None  # an interactive turn's edge (its reply partition)
    cancel_reason: str | None = None
    started: bool = False  # its coroutine has begun (a task cancelled before that never runs its finally blocks)
    finishing: bool = False  # generation is over; the completion is being delivered (cancel is moot)


class _Revoker(ConsumerRebalanceListener):
    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.worker.revoked = set(revoked)  # turns keep running through the rebalance …

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("inference: assigned %s", sorted(tp.partition for tp in assigned))
        lost = self.worker.revoked - set(assigned)  # … and stop only where the partition went elsewhere
        self.worker.revoked = set()
        if lost:
            await self.worker.drop_partitions(lost)


def build_output_screen(settings: Settings) -> OutputScreen:
    """The output rail's screen: the safety policy and classifier of ``settings``, over the query embedder."""
    from core.embeddings import get_embedder
    from core.safety.classifier import load_classifier
    from core.safety.policy import load_policy
    from core.safety.screen import Screener

    embedder = get_embedder(settings.embedding_model, settings.embedding_backend)
    classifier = None if settings.safety_classifier == "none" else load_classifier(settings.safety_classifier or None)
    screener = Screener(load_policy(settings.safety_policy), embedder.encode, settings.safety_similarity_threshold, classifier)
    return OutputScreen(screener)


def cached_pieces(text: str, words: int = 8) -> list[str]:
    """A cached answer in pieces of about ``words`` words (whitespace kept), as a generation would stream it."""
    parts = re.split(r"(?<=\s)(?=\S)", text)
    return ["".join(parts[i : i + words]) for i in range(0, len(parts), words)] or [text]


def served_pool(settings: Settings) -> ModelPool:
    """The model pool this worker serves (:mod:`topics.pools`): ``CHATBUS_POOL``, else the primary model's.
    Raises ValueError for a pool that ``CHATBUS_EXTRA_MODELS`` does not name."""
    if not settings.pool:
        return primary(settings)
    pool = pool_named(settings, settings.pool)
    if pool is None:
        raise ValueError(f"CHATBUS_POOL={settings.pool!r} is not one of CHATBUS_EXTRA_MODELS")
    return pool


def pool_settings(settings: Settings, pool: ModelPool) -> Settings:
    """The settings the engine of ``pool`` is built from: its model and served name (an ``openai`` engine
    keeps its upstream's model name, ``CHATBUS_MODEL``)."""
    if pool.primary:
        return settings
    update: dict[str, object] = {"served_model_name": pool.name}
    if settings.engine != "openai":
        update["model"] = pool.model
    return settings.model_copy(update=update)


class InferenceWorker(ConsumerRuntime):
    def __init__(self, settings: Settings, engine: Engine | None = None, output_screen: OutputScreen | None = None) -> None:
        self.pool = served_pool(settings)
        self.engine = engine or make_engine(pool_settings(settings, self.pool))
        self.output_screen = output_screen
        models = {m.strip() for m in settings.response_cache_models.split(",") if m.strip()}
        self.cache = ResponseCache(settings) if "*" in models or self.pool.name in models else None
        self.cancelled_batches = CancelledBatches(settings, on_cancel=self.cancel_batch)
        self.control = ControlTail(settings, on_cancel=self.cancel)
        super().__init__(
            settings,
            "inference",
            self.pool.group.group_id,
            self.pool.group.topics,
            companions=[self.engine, self.cancelled_batches, self.control, *([self.cache] if self.cache is not None else [])],
            max_poll_records=settings.engine_slots + settings.fair_queue_turns,
        )
        # with a fair queue, more turns are fetched than run; the engine's slots go round-robin over tenants
        self.slots = FairSlots(settings.max_inflight_turns, settings.fair_reserve_slots) if settings.fair_queue_turns > 0 else None
        self.fetch_limit = settings.engine_slots + (settings.fair_queue_turns if self.slots else 0)
        self.in_topic = topic(self.pool.grounded(), settings.topic_prefix)
        self.control_topic = topic(CHAT_CONTROL, settings.topic_prefix)
        self.member = f"inference-{socket.gethostname()}-{os.getpid()}"
        self.batch_limit = max(1, settings.max_inflight_turns - settings.interactive_reserve)
        self.tracker = OffsetTracker()
        self.running: dict[str, Running] = {}
        self.cancelled: OrderedDict[str, float] = OrderedDict()  # correlation id -> when the cancel arrived
        self.completed_turns = 0
        self.revoked: set[TopicPartition] = set()
        self.fatal: BaseException | None = None
        self._stop: asyncio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._stop = stop = stop or asyncio.Event()
        if self.output_screen is None and self.settings.output_rail:
            self.output_screen = await asyncio.to_thread(build_output_screen, self.settings)
            log.info("inference: output rail on (every %d tokens, window %d)", self.settings.output_rail_every_tokens, self.settings.output_rail_window_tokens)
        await super().run(stop)
        if self.fatal is not None:
            raise RuntimeError("inference worker stopped: a completion could not be delivered") from self.fatal

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return _Revoker(self)

    async def consume(self, stop: asyncio.Event) -> None:
        log.info(
            "inference: max %d turns generating (+%d for a tenant with none), %d more waiting for a fair turn, batch at most %d",
            self.settings.max_inflight_turns,
            self.slots.reserve if self.slots else 0,
            self.settings.fair_queue_turns if self.slots else 0,
            self.batch_limit,
        )
        next_check = next_beat = 0.0
        while not stop.is_set():
            for tp, records in (await self._fetch()).items():
                for record in records:
                    await self._admit(tp, record)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.settings.edge_heartbeat_s
                await self._beat()
            if now >= next_check:
                next_check = now + 1.0
                self.cancel_orphans()

    async def _beat(self) -> None:
        """This worker's own heartbeat on ``chat.control`` (not awaited): seen back, it says the bus flows."""
        beat = EdgeHeartbeat(correlation_id=f"edge:{self.member}", conversation_id=self.member, edge_id=self.member, reply_partition=None)
        try:
            async with asyncio.timeout(0.5):
                future = await self.producer.send(self.control_topic, beat.to_bytes(), key=beat.key)
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a lost beat is just lost
        except (TimeoutError, KafkaError):
            pass

    def cancel_orphans(self) -> list[str]:
        """Cancel the running turns whose edge is gone (no heartbeat for ``edge_timeout_s``, no edge
        streaming them to a resumed client). Returns their correlation ids."""
        gone = [
            cid
            for cid, r in self.running.items()
            if r.reply_partition is not None and not r.finishing and self.control.edges.gone(r.reply_partition, cid, self.settings.edge_timeout_s)
        ]
        for cid in gone:
            self.cancel(cid, "edge_gone")
        return gone

    def orphaned(self, turn: GroundedTurn) -> str | None:
        """Why an interactive turn must not start: ``expired`` (dequeued past ``turn_timeout_s`` after it
        was published) or ``edge_gone``; None to run it."""
        request = turn.request
        if request.batch is not None:
            return None
        published = turn.stages.get("edge_published") or request.stages.get("edge_published")
        if published is not None and time.time() - published > self.settings.turn_timeout_s:
            return "expired"
        partition = request.reply_to.partition
        if partition is not None and self.control.edges.gone(partition, turn.correlation_id, self.settings.edge_timeout_s):
            return "edge_gone"
        return None

    async def _fetch(self) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Interactive records first; batch records only into the slots batch work may take."""
        free = self.fetch_limit - len(self.running)
        batch_free = self.batch_limit - len(self.running)
        return await self.fetch_lanes({self.in_topic}, free, min(free, batch_free), idle_ms=100, full_ms=50)

    async def wind_down(self) -> None:
        await self._drain(timeout_s=10.0)

    async def _drain(self, timeout_s: float) -> None:
        """On shutdown: let running turns finish briefly, then abort the rest uncommitted (redelivered later)."""
        tasks = [r.task for r in self.running.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def drop_partitions(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: abort turns of partitions we no longer own, without completing or committing them."""
        victims = [r for r in self.running.values() if r.tp in revoked]
        for r in victims:
            r.task.cancel()
        await asyncio.gather(*(r.task for r in victims), return_exceptions=True)
        for tp in revoked:
            self.tracker.forget(tp)

    # --- control ---------------------------------------------------------------------------------------
    def cancel_batch(self, batch_id: str) -> None:
        """A batch was cancelled: abort its running turns (its queued ones finish as cancelled on arrival)."""
        for cid, running in list(self.running.items()):
            if running.batch_id == batch_id:
                self.cancel(cid, "batch_cancelled")

    def cancel(self, correlation_id: str, reason: str) -> bool:
        """Abort a running turn (True), or remember the cancel for when it arrives (False)."""
        now = time.monotonic()
        self.cancelled[correlation_id] = now
        while self.cancelled and next(iter(self.cancelled.values())) < now - CANCEL_MEMORY_S:
            self.cancelled.popitem(last=False)
        running = self.running.get(correlation_id)
        if running is None or running.finishing:
            return False
        if running.cancel_reason is not None:
            return True  # already being cancelled
        log.info("cancelling turn %s (%s)", correlation_id, reason)
        running.cancel_reason = reason
        if running.started:
            running.task.cancel()
        # else: not begun yet — cancelling the task now would skip its completion and its commit (and hold its
        # slot for good); it finds the cancel in self.cancelled as it starts and completes as cancelled
        return True

    # --- turns -------------------------------------------------------------------------------------------
    async def _admit(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        try:
            event = self.decode_record(record, GroundedTurn)
        except DecodeError as exc:
            await produce_retrying(self.producer, [self.reject(record, str(exc))], on_retry=self._bus_retry)
            await self._commit(tp, record.offset, started=False)
            return
        assert isinstance(event, GroundedTurn)
        if tp not in self.consumer.assignment() or self.tracker.handled(tp, record.offset):
            return  # revoked meanwhile, or refetched after a rebalance: already running or done here
        event.mark("inference_dequeued")
        cid = event.correlation_id
        if cid in self.running:  # the same turn delivered twice (e.g. re-published): one run is enough
            await self._commit(tp, record.offset, started=False)
            return
        self.tracker.start(tp, record.offset)
        task = asyncio.create_task(self._run_turn(event, tp, record), name=f"turn-{cid}")
        task.add_done_callback(lambda t, cid=cid: self._never_started(cid, t))  # type: ignore[misc]
        request = event.request
        self.running[cid] = Running(
            task,
            tp,
            record.offset,
            batch_id=request.batch.batch_id if request.batch else None,
            reply_partition=request.reply_to.partition if request.batch is None else None,
        )
        metrics.RUNNING.labels(event.request.source).inc()

    def _never_started(self, cid: str, task: asyncio.Task[None]) -> None:
        """A turn task cancelled before its first step (shutdown, a lost partition): free its slot."""
        running = self.running.get(cid)
        if running is not None and running.task is task and not running.started:
            self.running.pop(cid, None)
            metrics.RUNNING.labels("batch" if running.batch_id else "interactive").dec()

    async def _commit(self, tp: TopicPartition, offset: int, started: bool = True) -> None:
        if not started:
            self.tracker.start(tp, offset)
        point = self.tracker.finish(tp, offset)
        if point is not None:
            await self.commit(tp, point)  # a failure means the partition moved on a rebalance: the new owner redoes it

    async def _run_turn(self, turn: GroundedTurn, tp: TopicPartition, record: ConsumerRecord) -> None:
        cid = turn.correlation_id
        request = turn.request
        begun = self.running.get(cid)
        if begun is not None:
            begun.started = True
        attempt = new_id()
        # a rerouted turn goes on from the answer its dead pool had streamed (schemas.events.Continuation)
        continued = request.continuation.text if request.continuation is not None else ""
        earlier_tokens = request.continuation.completion_tokens if request.continuation is not None else 0
        text, buffer, flushes, tokens, prompt_tokens, cached_tokens = continued, "", 0, 0, 0, 0
        finish: FinishReason = "stop"
        error: str | None = None
        stages = turn.stages
        streams = request.batch is None  # the batch lane gets the completion only

        replies = ReplySender(self.producer, request, attempt, stages, on_retry=self._bus_retry, start=continued)

        async def flush() -> None:
            nonlocal text, buffer, flushes
            if buffer and streams:
                replies.push(buffer, earlier_tokens + tokens)
                flushes += 1
            text, buffer = text + buffer, ""

        extra: list[Outgoing] = []
        citations = list(turn.citations)
        screen = self.output_screen
        rail = OutputRail(self.settings.output_rail_every_tokens, self.settings.output_rail_window_tokens) if screen is not None else None
        screening = OutputScreening(screen) if screen is not None else None
        violation: OutputVerdict | None = None
        tools = [t.model_dump(exclude_none=True) for t in request.tools]
        prefix = continued or (forced_prefix(request.tool_choice) if tools and self.engine.applies_prefix else "")
        # tool calls are held back, never streamed as text
        calling = ToolCallStream(prefix, [t.function.name for t in request.tools]) if tools and not continued else None
        calls: list[ToolCall] = []
        key: str | None = None  # the exact response cache's key, when the turn may use it
        cached: Literal["exact", "semantic"] | None = None
        try:
            try:
                orphaned = None if cid in self.cancelled or request in self.cancelled_batches else self.orphaned(turn)
                if orphaned is not None:
                    log.info("not starting turn %s: %s", cid, orphaned)
                if cid in self.cancelled or request in self.cancelled_batches or orphaned is not None:
                    finish = "cancelled"
                else:
                    max_tokens = min(request.sampling.max_tokens, self.settings.max_model_len)
                    budget = prompt_budget(self.settings.prefill_budget_tokens, self.settings.max_model_len, max_tokens)
                    count = functools.partial(self.engine.count_prompt_tokens, tools=tools or None)  # the tools take prompt room too
                    messages, citations = await asyncio.to_thread(fit_grounded, turn, count, budget)
                    gen = GenerationRequest(
                        request_id=f"{cid}:{attempt}",
                        messages=messages,
                        max_tokens=max_tokens,
                        max_prompt_tokens=self.settings.prefill_budget_tokens or None,
                        temperature=request.sampling.temperature,
                        top_p=request.sampling.top_p,
                        stop=list(request.sampling.stop),
                        seed=request.sampling.seed if request.sampling.seed is not None else derived_seed(cid),
                        tools=tools or None,
                        tool_choice=request.tool_choice,
                        assistant_prefix=prefix,
                    )
                    key = None
                    if self.cache is not None and turn.cached is None and cacheable(turn) is None:
                        key = cache_key(self.engine.model_name, messages, max_tokens, list(request.sampling.stop))
                    hit = await self.cache.get(key) if self.cache is not None and key is not None else None
                    if turn.cached is not None:  # the retrieval worker found it in the semantic cache
                        hit, cached = (
                            CachedAnswer(turn.cached.text, turn.cached.finish_reason, turn.cached.prompt_tokens, turn.cached.completion_tokens),
                            "semantic",
                        )
                    elif hit is not None:
                        cached = "exact"
                    if hit is not None:  # streamed on the bus like a generated answer (inference_workers.response_cache)
                        stages["inference_scheduled"] = stages["first_token"] = time.time()
                        finish, prompt_tokens, tokens = hit.finish_reason, hit.prompt_tokens, hit.completion_tokens
                        for piece in cached_pieces(hit.text):
                            buffer += piece
                            await flush()
                    else:
                        last_flush = time.monotonic()
                        flushed_tokens = 0
                        async with self.generation_slot(request, stages):  # fair share across tenants (inference_workers.fair)
                            deltas = self.engine.generate(gen)
                            try:
                                async for delta in deltas:
                                    if "first_token" not in stages and (delta.text or delta.finish_reason):
                                        stages["first_token"] = time.time()
                                    tokens, prompt_tokens, cached_tokens = delta.completion_tokens, delta.prompt_tokens, delta.cached_tokens
                                    if delta.finish_reason:
                                        finish = ENGINE_FINISH.get(delta.finish_reason, "stop")
                                    piece = delta.text if calling is None else calling.feed(delta.text)
                                    if rail is None or screening is None:
                                        buffer += piece
                                    else:
                                        rail.feed(piece, tokens)
                                        violation = await screening.step(rail)
                                        if violation is not None:
                                            break
                                        buffer += rail.release()
                                    elapsed_ms = (time.monotonic() - last_flush) * 1000
                                    if buffer and (
                                        flushes == 0 or elapsed_ms >= self.settings.coalesce_ms or tokens - flushed_tokens >= self.settings.coalesce_tokens
                                    ):
                                        await flush()
                                        last_flush, flushed_tokens = time.monotonic(), tokens
                            finally:
                                aclose = getattr(deltas, "aclose", None)
                                if aclose is not None:  # a break (a violation) aborts generation now, not at garbage collection
                                    await aclose()
                        if calling is not None and violation is None:
                            rest, calls = calling.finish()
                            if rail is None:
                                buffer += rest
                            else:
                                rail.feed(rest, tokens)
                            check_calls(calls, request.tools, request.tool_choice)
                            calls = calls if request.parallel_tool_calls else calls[:1]
                            if calls:
                                finish = "tool_calls"
                        if rail is not None and screening is not None and violation is None:
                            violation = await screening.finish(rail)
                            if violation is None:
                                buffer += rail.release(final=True)
                        if violation is None:
                            await flush()
                        else:
                            finish, buffer = "content_filter", ""  # what was not sent yet is simply dropped
                    stages["last_token"] = time.time()
            except asyncio.CancelledError:
                running = self.running.get(cid)
                if running is None or running.cancel_reason is None:
                    raise  # shutdown or a lost partition: leave it uncommitted, another attempt will redo it
                finish = "cancelled"
                await flush()
            except InvalidToolCall as exc:  # the model's call is unusable: the client is told why (not a poison message)
                log.info("turn %s: %s", cid, exc)
                finish, error, calls = "error", f"{INVALID_TOOL_CALL}{exc}"[:1000], []
                await flush()
            except Exception as exc:  # the engine failed on this turn: answer with an error, keep serving
                log.exception("generation failed for %s", cid)
                finish, error = "error", f"{type(exc).__name__}: {exc}"[:500]
                extra.append(self.reject(record, error, cid))
            finally:
                if screening is not None:
                    screening.cancel()
            retraction: Retraction | None = None
            if violation is not None and rail is not None and screen is not None:
                retraction = Retraction(
                    category=violation.category,
                    reason=violation.reason,
                    scores=violation.scores,
                    policy_version=screen.policy_version,
                    withdrawn_chars=len(text),
                    withdrawn_text=rail.withdrawn_text(),
                    leaked_tokens=rail.leaked_tokens,
                )
                log.info("turn %s retracted by the output rail: %s (%d characters withdrawn)", cid, violation.category, len(text))
                metrics.OUTPUT_RETRACTIONS.labels(violation.category).inc()
                review = ReviewItem(
                    correlation_id=cid,
                    conversation_id=request.conversation_id,
                    kind="retracted",
                    category=violation.category,
                    reason=violation.reason,
                    score=max(violation.scores.values(), default=1.0),
                    scores=violation.scores,
                    policy_version=screen.policy_version,
                    prompt=request.messages,
                    response=SAFETY_MESSAGE,
                    withdrawn=retraction.withdrawn_text,
                    model=self.engine.model_name,
                )
                extra.append(Outgoing(topic(SAFETY_REVIEW, self.settings.topic_prefix), review.to_bytes(), key=review.key))
            if rail is not None and rail.pii:
                metrics.OUTPUT_PII.inc(len(rail.pii))
            running = self.running.get(cid)
            if running is not None:
                running.finishing = True
            await replies.drain()  # the token events first (through an outage too), then the completion
            done = completion(
                request,
                attempt=attempt,
                seq=replies.seq,
                finish_reason=finish,
                text=SAFETY_MESSAGE if retraction is not None else text,
                model=self.engine.model_name,
                stages=stages,
                usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=earlier_tokens + tokens, cached_tokens=cached_tokens),
                citations=citations,
                verdict=turn.verdict,
                retrieval_status=turn.retrieval.status if turn.retrieval.status == "ok" else f"skipped ({turn.retrieval.reason})",
                error=error,
                retraction=retraction,
                tool_calls=calls,
                cache=cached,
            )
            storable = cached is None and error is None and retraction is None and not calls and not (rail is not None and rail.pii)
            if storable and finish in ("stop", "length"):
                if self.cache is not None and key is not None:
                    self.cache.put_soon(key, CachedAnswer(text, finish, prompt_tokens, tokens), self.engine.model_name)
                entry = self.semantic_entry(turn, text, finish, prompt_tokens, tokens)
                if entry is not None:  # for the retrieval worker to upsert (retrieval_workers.semantic_cache)
                    extra.append(Outgoing(topic(CACHE_ENTRIES, self.settings.topic_prefix), entry.to_bytes(), key=entry.key))
            extra.append(to_reply(request, done.to_bytes()))
            observe_turn(done)
            # delivering the completion and committing must not be cut short by a late cancel
            await asyncio.shield(self._complete(done, extra, tp, record.offset))
        finally:
            await replies.close()
            self.running.pop(cid, None)
            metrics.RUNNING.labels(request.source).dec()

    def semantic_entry(self, turn: GroundedTurn, text: str, finish: FinishReason, prompt_tokens: int, tokens: int) -> CacheEntry | None:
        """The semantic cache's entry for a generated answer to a conversation's first question, or None."""
        request = turn.request
        if finish not in ("stop", "length") or not models_on(self.settings.semantic_cache_models, self.pool.name) or not_cacheable(request, turn.verdict):
            return None
        first = first_question(request)
        if first is None or not text.strip():
            return None
        question, system = first
        return CacheEntry(
            correlation_id=turn.correlation_id,
            conversation_id=turn.conversation_id,
            tenant=tenant_of(request),
            model=self.pool.name,
            system=system,
            question=question,
            answer=text,
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=tokens,
            expires_at=time.time() + self.settings.response_cache_ttl_s,
        )

    @contextlib.asynccontextmanager
    async def generation_slot(self, request: ChatTurnRequest, stages: dict[str, float]) -> AsyncIterator[None]:
        """Hold one of the engine's slots while generating, taken round-robin over tenants when turns wait
        (``fair_queue_turns`` > 0; otherwise every fetched turn runs at once)."""
        if self.slots is None:
            stages["inference_scheduled"] = time.time()
            yield
            return
        tenant = request.tenant or request.owner or "anonymous"
        await self.slots.acquire(tenant, request.source)
        stages["inference_scheduled"] = time.time()
        try:
            yield
        finally:
            self.slots.release(tenant)

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _bus_retry(self, exc: BaseException) -> None:
        log.warning("inference: the broker did not acknowledge a send (%s: %s); retrying", type(exc).__name__, exc)
        metrics.BUS_RETRIES.labels(self.name).inc()

    async def _complete(self, done: TurnCompleted, extra: list[Outgoing], tp: TopicPartition, offset: int) -> None:
        """Produce the completion (and any dead letter or review item), retried through a broker outage
        until acknowledged, then commit. A broker outage is not the turn's fault: nothing is dead-lettered
        for it, and the turn stays uncommitted until its completion is delivered."""
        try:
            await produce_retrying(self.producer, extra, on_retry=self._bus_retry, stopping=self._stopping)
        except KafkaError as exc:
            if self._stopping():
                log.warning("turn %s left uncommitted at shutdown (the broker did not acknowledge it): it will be redone", done.correlation_id)
                return
            # refused for good (not an outage): not committing would stall this partition's commits behind
            # it, so stop the worker instead and let the turn be redelivered to a healthy one
            log.error("could not deliver the completion of %s: %s; stopping", done.correlation_id, exc)
            self.fatal = exc
            if self._stop is not None:
                self._stop.set()
            return
        self.completed_turns += 1
        log.info("turn %s %s: %d tokens", done.correlation_id, done.finish_reason, done.usage.completion_tokens)
        await self._commit(tp, offset)


class OutputScreening:
    """One turn's screens in flight: at most one at a time, in a thread (:class:`OutputScreen` is sync)."""

    def __init__(self, screen: OutputScreen) -> None:
        self.screen = screen
        self.task: asyncio.Future[OutputVerdict] | None = None
        self.at = (0, 0)

    def _start(self, rail: OutputRail) -> None:
        end, tokens, text, start = rail.checkpoint()
        self.at = (end, tokens)
        self.task = asyncio.ensure_future(asyncio.to_thread(self.screen.check, text, start))

    def _settle(self, rail: OutputRail, verdict: OutputVerdict) -> OutputVerdict | None:
        self.task = None
        if not verdict.allowed:
            return verdict
        rail.passed(*self.at)
        return None

    async def step(self, rail: OutputRail) -> OutputVerdict | None:
        """After each piece: collect a finished screen (a violation is returned), start a due one."""
        if self.task is not None and self.task.done():
            violation = self._settle(rail, self.task.result())
            if violation is not None:
                return violation
        if self.task is None and rail.due():
            self._start(rail)
        return None

    async def finish(self, rail: OutputRail) -> OutputVerdict | None:
        """Generation ended: wait for the screen in flight, then screen whatever it did not cover."""
        if self.task is not None:
            violation = self._settle(rail, await self.task)
            if violation is not None:
                return violation
        if rail.screened < len(rail.raw):
            self._start(rail)
            assert self.task is not None
            return self._settle(rail, await self.task)
        return None

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


def observe_turn(done: TurnCompleted) -> None:
    """The engine's share of a finished turn in this process's metrics (TTFT, TPOT, token counters)."""
    model, stages, usage = done.model, done.stages, done.usage
    metrics.PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
    metrics.GENERATION_TOKENS.labels(model).inc(usage.completion_tokens)
    started = stages.get("inference_scheduled", stages.get("inference_dequeued"))
    if "first_token" in stages and started is not None:
        metrics.ENGINE_TTFT.labels(model).observe(stages["first_token"] - started)
    if usage.completion_tokens > 1 and "last_token" in stages and "first_token" in stages:
        metrics.TPOT.labels(model).observe((stages["last_token"] - stages["first_token"]) / (usage.completion_tokens - 1))


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await InferenceWorker(settings).run(stop)
