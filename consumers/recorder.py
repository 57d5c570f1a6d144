"""Recorder: persists conversations, turns, safety verdicts, retrieval sources and final answers.

Consumer group ``chatbus-recorder`` on ``chat.requests``, ``chat.screened``, ``chat.grounded`` and
``chat.replies`` (completions only; token events are skipped). Storage is any MongoDB API (MongoDB,
FerretDB) through PyMongo's ``AsyncMongoClient``. Collections:

* ``conversations`` — ``_id`` = conversation id; ``turn_ids``, ``title``, ``created_at``, ``updated_at``.
* ``turns`` — ``_id`` = correlation id; masked ``messages``, ``sampling``, ``verdict``, ``retrieval``
  (status, reason, sources), ``answer`` (text, finish_reason, usage, model), ``stages``, ``events``.
* ``verdicts`` — ``_id`` = correlation id; the safety verdict with its conversation id.
* ``safety_review``, ``safety_audit`` and the records reviewers' decisions become: ``safety.review``
  (:mod:`consumers.review`).

The documents' shape and field names are :mod:`schemas.documents` (the edge reads them through it).

Writes are batched: each fetched batch of a partition (up to 256 records) becomes one ordered
``bulk_write`` per collection (turns, conversations, verdicts) instead of three round trips per event —
the recorder keeps up with the interactive lane at several turns a second (``bench/recorder.py``).

A database outage never loses a record: after a few quick retries the event is left uncommitted and
retried with back-off (:class:`consumers.stage.RetryLater`). Every write is an upsert of fields derived only
from the event (``$set``/``$setOnInsert``/``$addToSet``), so replaying an event — at-least-once delivery — changes nothing: idempotent by ``event_id``, and
events of one turn may arrive in any order across topics. Text is PII-masked before it is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import ConsumerRecord
from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from consumers.review import ReviewLog
from consumers.stage import RetryLater, StageWorker
from core.config import Settings
from core.pii import mask_pii
from core.usage import TokenPrice, cost_usd
from producers.bus import Outgoing
from schemas.documents import CONVERSATIONS, ID, TURNS, VERDICTS, AnswerDoc, Conversation, ConversationDoc, MessageDoc, RetrievalDoc, Turn, TurnDoc
from schemas.events import (
    AnyEvent,
    ChatMessage,
    ChatTurnRequest,
    GroundedTurn,
    ReviewDecision,
    ReviewItem,
    ScreenedTurn,
    TokenEvent,
    ToolCall,
    TurnCompleted,
    last_user_text,
)
from topics.pools import pools
from topics.registry import RECORDER

T = TypeVar("T")

log = logging.getLogger(__name__)


def masked_messages(messages: Sequence[ChatMessage]) -> list[MessageDoc]:
    out: list[MessageDoc] = []
    for m in messages:
        doc = MessageDoc(role=m.role, content=mask_pii(m.content)[0])
        if m.tool_calls:
            doc["tool_calls"] = masked_calls(m.tool_calls)
        if m.tool_call_id is not None:
            doc["tool_call_id"] = m.tool_call_id
        out.append(doc)
    return out


def masked_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as stored: their arguments PII-masked like every stored text."""
    out = [c.model_dump() for c in calls]
    for call in out:
        call["function"]["arguments"] = mask_pii(call["function"]["arguments"])[0]
    return out


def turn_updates(event: AnyEvent, prices: Mapping[str, TokenPrice] | None = None) -> TurnDoc | None:
    """The ``$set`` fields an event contributes to its turn document (None: nothing to record); an answer's
    cost is priced by ``prices`` (:func:`core.usage.cost_usd`)."""
    if isinstance(event, ChatTurnRequest):
        doc = TurnDoc(
            conversation_id=event.conversation_id,
            model=event.model,
            messages=masked_messages(event.messages),
            sampling=event.sampling.model_dump(),
            source=event.source,
            created_at=event.created_at,
        )
        if event.owner:
            doc["owner"] = event.owner
        if event.route is not None:
            doc["route"] = event.route.model_dump()
        return doc
    if isinstance(event, ScreenedTurn):
        return TurnDoc(conversation_id=event.conversation_id, verdict=event.verdict.model_dump(), messages=masked_messages(event.request.messages))
    if isinstance(event, GroundedTurn):
        return TurnDoc(
            conversation_id=event.conversation_id,
            retrieval=RetrievalDoc(
                status=event.retrieval.status,
                reason=event.retrieval.reason,
                latency_ms=event.retrieval.latency_ms,
                sources=[p.model_dump(exclude={"text"}) for p in event.retrieval.passages],
            ),
        )
    if isinstance(event, TurnCompleted):
        fields = TurnDoc(
            conversation_id=event.conversation_id,
            answer=AnswerDoc(
                text=mask_pii(event.text)[0],
                finish_reason=event.finish_reason,
                model=event.model,
                usage=event.usage.model_dump(),
                cost_usd=cost_usd(event.model, event.usage.prompt_tokens, event.usage.completion_tokens, prices or {}),
                attempt=event.attempt,
                error=event.error,
                citations=[c.model_dump() for c in event.citations],
                completed_at=event.created_at,
            ),
            stages=event.stages,
        )
        if event.retraction is not None:
            retraction = event.retraction.model_dump()
            retraction["withdrawn_text"] = mask_pii(event.retraction.withdrawn_text)[0]
            fields["answer"]["retraction"] = retraction
        if event.tool_calls:
            fields["answer"]["tool_calls"] = masked_calls(event.tool_calls)
        if event.cache is not None:
            fields["answer"]["cache"] = event.cache
        if event.verdict is not None:
            fields["verdict"] = event.verdict.model_dump()
        return fields
    return None


class Recorder:
    def __init__(self, settings: Settings, client: AsyncMongoClient[dict[str, Any]] | None = None) -> None:
        self.settings = settings
        self.client: AsyncMongoClient[dict[str, Any]] = client or AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5_000)
        self.db: AsyncDatabase[dict[str, Any]] = self.client[settings.mongo_db]
        self.review = ReviewLog(self.db, settings.topic_prefix)

    async def record(self, event: AnyEvent) -> bool:
        """Record one event (True) or skip it (token events, events with nothing to record)."""
        return await self.record_many([event]) == 1

    async def record_many(self, events: Sequence[AnyEvent]) -> int:
        """Record ``events`` (in order) with one ordered ``bulk_write`` per collection; returns how many
        were recorded. Raises :class:`RetryLater` if the database stays unavailable (nothing committed:
        the writes are idempotent, so a retry after a partial write changes nothing)."""
        ops: dict[str, list[UpdateOne]] = {TURNS: [], CONVERSATIONS: [], VERDICTS: []}
        recorded = 0
        for event in events:
            if isinstance(event, TokenEvent):
                continue
            fields = turn_updates(event, self.settings.prices)
            if fields is None:
                continue
            for name, more in self.operations(event, str(event.correlation_id), fields).items():  # type: ignore[union-attr]
                ops[name] += more
            recorded += 1
        if recorded:

            async def write() -> None:
                for name in (TURNS, CONVERSATIONS, VERDICTS):  # a turn's document first, as one by one
                    if ops[name]:
                        await self.db[name].bulk_write(ops[name], ordered=True)

            await self._retrying(write)
        return recorded

    def operations(self, event: AnyEvent, cid: str, fields: TurnDoc) -> dict[str, list[UpdateOne]]:
        """The upserts recording one event, per collection."""
        conv = fields["conversation_id"]
        out: dict[str, list[UpdateOne]] = {TURNS: [UpdateOne({ID: cid}, {"$set": fields, "$addToSet": {Turn.EVENTS: event.event_id}}, upsert=True)]}
        on_insert = ConversationDoc(created_at=event.created_at)
        conv_update: dict[str, Any] = {
            "$setOnInsert": on_insert,
            "$max": {Conversation.UPDATED_AT: event.created_at},
            "$addToSet": {Conversation.TURN_IDS: cid},
        }
        if isinstance(event, ChatTurnRequest):
            on_insert["title"] = mask_pii(last_user_text(event.messages))[0][:80]
            if event.owner:
                on_insert["owner"] = event.owner
            if event.user:
                conv_update["$set"] = ConversationDoc(user=event.user)
        out[CONVERSATIONS] = [UpdateOne({ID: conv}, conv_update, upsert=True)]
        if "verdict" in fields:
            out[VERDICTS] = [UpdateOne({ID: cid}, {"$set": {**fields["verdict"], Turn.CONVERSATION_ID: conv}}, upsert=True)]
        return out

    async def handle_batch(self, batch: Sequence[tuple[AnyEvent, ConsumerRecord]]) -> Sequence[Outgoing]:
        """A fetched batch: turn events in bulk, review events one by one (in order, after the turns)."""
        await self.record_many([event for event, _ in batch if not isinstance(event, ReviewItem | ReviewDecision)])
        out: list[Outgoing] = []
        for event, record in batch:
            if isinstance(event, ReviewItem | ReviewDecision):
                out += await self.handle(event, record)
        return out

    async def handle(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        if isinstance(event, ReviewItem | ReviewDecision):
            return await self._retrying(lambda: self.review.on_item(event) if isinstance(event, ReviewItem) else self.review.on_decision(event))
        await self.record(event)
        return []

    async def _retrying(self, write: Callable[[], Awaitable[T]]) -> T:
        """``write()`` with a few quick retries; then :class:`RetryLater` (the event stays on the bus)."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(PyMongoError), stop=stop_after_attempt(3), wait=wait_exponential(0.2, max=2), reraise=True
            ):
                with attempt:
                    return await write()
        except PyMongoError as exc:
            raise RetryLater(f"database unavailable: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


def recorder_worker(settings: Settings, recorder: Recorder, bulk: bool = True) -> StageWorker:
    """The recorder's consumer: bulk writes per fetched batch (``bulk``), token events dropped unvalidated."""
    return StageWorker(
        settings,
        "recorder",
        RECORDER.group_id,
        (*RECORDER.topics, *(p.grounded() for p in pools(settings)[1:])),  # and each extra model's chat.grounded.<pool>
        recorder.handle,
        max_records=256,
        batch_handler=recorder.handle_batch if bulk else None,
        skip_event_types=("chat.token",),
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    recorder = Recorder(settings)
    worker = recorder_worker(settings, recorder)
    try:
        await worker.run(stop)
    finally:
        await recorder.client.close()
