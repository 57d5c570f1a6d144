"""Building the events that travel on a turn's ``reply_to`` (token events and the completion), and
sending them through a broker outage (:class:`ReplySender`, :func:`produce_retrying`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producers.bus import Outgoing, is_outage, produce_all
from schemas.events import ChatTurnRequest, Citation, FinishReason, Retraction, SafetyVerdict, TokenEvent, ToolCall, TurnCompleted, Usage, new_id


def to_reply(request: ChatTurnRequest, value: bytes) -> Outgoing:
    """An event produced to the partition the turn's edge instance reads."""
    return Outgoing(request.reply_to.topic, value, key=request.conversation_id.encode(), partition=request.reply_to.partition)


def whole_reply(
    request: ChatTurnRequest,
    text: str,
    finish_reason: FinishReason,
    model: str,
    *,
    stages: dict[str, float],
    verdict: SafetyVerdict | None = None,
    citations: list[Citation] | None = None,
    usage: Usage | None = None,
    error: str | None = None,
    retrieval_status: str = "",
) -> list[Outgoing]:
    """A complete answer in one go (a refusal, an error): one token event and the completion."""
    attempt = new_id()
    out: list[Outgoing] = []
    seq = 0
    if text and request.batch is None:  # the batch lane wants the completion only
        out.append(to_reply(request, token_event(request, attempt=attempt, seq=0, delta=text, text_offset=0, stages=stages).to_bytes()))
        seq = 1
    done = completion(
        request,
        attempt=attempt,
        seq=seq,
        finish_reason=finish_reason,
        text=text,
        model=model,
        stages=stages,
        usage=usage,
        citations=citations,
        verdict=verdict,
        error=error,
        retrieval_status=retrieval_status,
    )
    out.append(to_reply(request, done.to_bytes()))
    return out


def token_event(
    request: ChatTurnRequest, *, attempt: str, seq: int, delta: str, text_offset: int, completion_tokens: int = 0, stages: dict[str, float] | None = None
) -> TokenEvent:
    """One piece of an attempt's text: ``delta`` starts at character ``text_offset`` of the answer; the
    first event of an attempt (``seq`` 0) carries the turn's ``stages`` so far (copied)."""
    return TokenEvent(
        correlation_id=request.correlation_id,
        conversation_id=request.conversation_id,
        attempt=attempt,
        seq=seq,
        delta=delta,
        text_offset=text_offset,
        completion_tokens=completion_tokens,
        stages=dict(stages) if stages is not None else {},
    )


def completion(
    request: ChatTurnRequest,
    *,
    attempt: str,
    seq: int,
    finish_reason: FinishReason,
    text: str,
    model: str,
    stages: dict[str, float],
    usage: Usage | None = None,
    citations: list[Citation] | None = None,
    verdict: SafetyVerdict | None = None,
    error: str | None = None,
    retrieval_status: str = "",
    retraction: Retraction | None = None,
    tool_calls: list[ToolCall] | None = None,
    cache: Literal["exact", "semantic"] | None = None,
) -> TurnCompleted:
    """The turn's final event (``chat.turn.completed``): ``seq`` follows the attempt's last token event;
    ``stages`` (wall-clock seconds per stage, :mod:`schemas.timing`) is copied."""
    return TurnCompleted(
        correlation_id=request.correlation_id,
        conversation_id=request.conversation_id,
        attempt=attempt,
        stages=dict(stages),
        seq=seq,
        finish_reason=finish_reason,
        text=text,
        model=model,
        usage=usage or Usage(),
        citations=citations or [],
        verdict=verdict,
        error=error,
        retrieval_status=retrieval_status,
        batch=request.batch,
        retraction=retraction,
        tool_calls=tool_calls or [],
        cache=cache,
    )


class ReplySender:
    """One attempt's token events, sent in order with one in flight, each acknowledged before the next.

    :meth:`push` hands over new text; a background task sends everything not yet acknowledged as one
    token event starting at the last acknowledged character (``text_offset``), so text that arrives while
    a send is in flight is merged into the next event. A send the broker does not acknowledge with a
    *retriable* error (a broker outage: ``KafkaTimeoutError``, a lost leader) is retried with back-off
    (``retry_s`` doubling up to ``max_retry_s``) from the last acknowledged character — the edge's splice
    (:meth:`edge.relay.TurnStream.splice`) drops what it already has, so an outage pauses the stream and
    never leaves a gap. A non-retriable refusal stops the token events (``broken``): the completion
    carries the whole text anyway. :meth:`drain` waits until every character is acknowledged.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        request: ChatTurnRequest,
        attempt: str,
        stages: dict[str, float],
        *,
        retry_s: float = 0.5,
        max_retry_s: float = 5.0,
        on_retry: Callable[[BaseException], None] | None = None,
        start: str = "",
    ) -> None:
        """``start``: text the client already has (a continued answer, :class:`schemas.events.Continuation`):
        the first event's ``text_offset`` is its length."""
        self.producer = producer
        self.request = request
        self.attempt = attempt
        self.stages = stages
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.on_retry = on_retry
        self.text = start
        self.acked = len(start)  # characters of ``text`` the broker acknowledged
        self.seq = 0  # the next token event's seq (events acknowledged so far)
        self.completion_tokens = 0
        self.retries = 0
        self.broken: BaseException | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def push(self, delta: str, completion_tokens: int) -> None:
        """Queue ``delta`` (the next characters of the answer) for sending."""
        if not delta:
            return
        self.text += delta
        self.completion_tokens = completion_tokens
        if self.broken is not None:
            return
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"replies-{self.request.correlation_id}")

    async def _run(self) -> None:
        try:
            await self._send_all()
        except Exception as exc:  # never leave drain() waiting: the completion carries the whole text anyway
            self.broken = exc
            self._idle.set()

    async def _send_all(self) -> None:
        delay = self.retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.acked < len(self.text):
                end = len(self.text)
                ev = token_event(
                    self.request,
                    attempt=self.attempt,
                    seq=self.seq,
                    delta=self.text[self.acked : end],
                    text_offset=self.acked,
                    completion_tokens=self.completion_tokens,
                    stages=self.stages if self.seq == 0 else None,
                )
                out = to_reply(self.request, ev.to_bytes())
                try:
                    await (await self.producer.send(out.topic, out.value, key=out.key, partition=out.partition))
                except KafkaError as exc:
                    if not is_outage(exc):
                        self.broken = exc
                        self._idle.set()
                        return
                    self.retries += 1
                    if self.on_retry is not None:
                        self.on_retry(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.max_retry_s)
                    continue
                delay = self.retry_s
                self.acked, self.seq = end, self.seq + 1
            self._idle.set()

    async def drain(self) -> None:
        """Wait until every pushed character is acknowledged (or the events broke off)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop the sending task (whatever is unacknowledged stays so)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._idle.set()


async def produce_retrying(
    producer: AIOKafkaProducer,
    outgoing: Sequence[Outgoing],
    *,
    retry_s: float = 0.5,
    max_retry_s: float = 5.0,
    on_retry: Callable[[BaseException], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> None:
    """:func:`producers.bus.produce_all`, retried with back-off while the broker answers with a retriable
    error (an outage); a non-retriable :class:`~aiokafka.errors.KafkaError` is raised, and so is a
    retriable one once ``stopping()`` is true (the process is shutting down). A retry may
    duplicate an event whose first send did land: readers are idempotent on ``event_id``/correlation id."""
    delay = retry_s
    while True:
        try:
            await produce_all(producer, outgoing)
            return
        except KafkaError as exc:
            if not is_outage(exc) or (stopping is not None and stopping()):
                raise
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_retry_s)
