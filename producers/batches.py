"""The batch lane's writes: job events on ``batch.jobs`` (``batch.created``, ``batch.cancelled``; keyed by
batch id) and each valid line as a chat turn (``source="batch"``) on ``batch.requests`` with ``reply_to``
``batch.results`` (keyed by its correlation id, which is also its conversation id)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer

from core.config import Settings
from core.pii import mask_messages, pseudonym
from schemas.events import BatchCancelled, BatchCreated, BatchRef, ChatTurnRequest, ReplyTo
from schemas.openai import ChatCompletionRequest
from topics.registry import BATCH_JOBS, BATCH_REQUESTS, BATCH_RESULTS, topic


class BatchProducer:
    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer
        self.jobs_topic = topic(BATCH_JOBS, settings.topic_prefix)
        self.requests_topic = topic(BATCH_REQUESTS, settings.topic_prefix)
        self.reply_to = ReplyTo(topic=topic(BATCH_RESULTS, settings.topic_prefix))

    async def created(self, event: BatchCreated) -> None:
        """Publish ``batch.created`` (acknowledged) before any of its lines."""
        await self.producer.send_and_wait(self.jobs_topic, event.to_bytes(), key=event.key)

    async def cancelled(self, batch_id: str, reason: str) -> BatchCancelled:
        """Publish ``batch.cancelled`` (acknowledged); returns the event."""
        event = BatchCancelled(batch_id=batch_id, reason=reason)
        await self.producer.send_and_wait(self.jobs_topic, event.to_bytes(), key=event.key)
        return event

    def line_turn(
        self, correlation_id: str, batch_id: str, custom_id: str, line: int, request: ChatCompletionRequest, owner: str | None = None, tenant: str | None = None
    ) -> ChatTurnRequest:
        """The chat turn of one valid input line (stamped ``batch_submitted``), with its key's identity
        (``owner``) and tenant, so the fair queue counts it as theirs."""
        messages, pii = mask_messages(request.chat_messages())  # batch.requests holds no raw prompt either
        tools, tool_choice = request.offered_tools()
        turn = ChatTurnRequest(
            correlation_id=correlation_id,
            conversation_id=correlation_id,
            model=request.model,
            messages=messages,
            pii=pii,
            sampling=request.sampling(self.settings.default_max_tokens),
            reply_to=self.reply_to,
            user=pseudonym(request.user, self.settings.pseudonym_key_bytes()),
            source="batch",
            batch=BatchRef(batch_id=batch_id, custom_id=custom_id, line=line),
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=request.parallel_tool_calls,
            owner=owner,
            tenant=tenant,
        )
        turn.mark("batch_submitted")
        return turn

    async def send_line(self, turn: ChatTurnRequest) -> asyncio.Future[Any]:
        """Queue a line's turn; returns the future of its acknowledgement (await many together)."""
        future: asyncio.Future[Any] = await self.producer.send(self.requests_topic, turn.to_bytes(), key=turn.key)
        return future
