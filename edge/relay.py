"""The edge's reply relay: reads this edge instance's reply partition and routes events to open turns.

Each edge instance owns one partition of ``chat.replies`` (``CHATBUS_REPLY_PARTITION``) and puts it in
every request's ``reply_to``. The relay reads that partition without a consumer group (manual
assignment, starting at the end) and hands each token or completion event to the turn waiting for
its correlation id; events for turns nobody waits for (a client gone) are dropped.

A turn redelivered to another inference worker after a crash arrives as a new *attempt* whose token
events restart at ``text_offset`` 0: :class:`TurnStream` passes on only text past what the client has
already received, so the client sees each character once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Container

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.background import BackgroundService
from core.config import Settings
from schemas.events import DecodeError, TokenEvent, TurnCompleted, decode_object
from topics.clients import make_consumer, records_forever
from topics.registry import CHAT_REPLIES, topic

log = logging.getLogger(__name__)


ALIASES = 4096  # rerouted turns remembered per edge


class TurnTimeout(Exception):
    pass


class Draining(Exception):
    """This edge is shutting down: the stream ends here and its client resumes it on another edge."""


def sse_event_id(correlation_id: str, partition: int, since_ms: int, delivered: int) -> str:
    """The SSE ``id`` of a streamed turn's event: enough to resume it from Kafka on any edge —
    the turn, its reply partition, a time (ms) before its first reply event, and the characters the
    client has received so far."""
    return f"{correlation_id}:{partition}:{since_ms}:{delivered}"


def parse_event_id(value: str) -> tuple[str, int, int, int]:
    """``(correlation_id, partition, since_ms, delivered)`` of an :func:`sse_event_id`; ValueError if malformed."""
    cid, partition, since_ms, delivered = value.strip().split(":")
    if not cid.startswith("chatcmpl-") or not cid[9:].isalnum():
        raise ValueError("not a chatbus turn id")
    return cid, int(partition), int(since_ms), int(delivered)


class TurnStream:
    """The events of one turn, in order, as text pieces followed by the completion."""

    def __init__(self, correlation_id: str) -> None:
        self.correlation_id = correlation_id
        # one deque and one future instead of an asyncio.Queue (four deques): ~2 KB less per open stream,
        # which counts at 10,000 streams (bench/open_streams.py)
        self._events: collections.deque[TokenEvent | TurnCompleted] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.delivered = 0  # characters of the completion already handed out
        self.done: TurnCompleted | None = None
        self.cancel_sent = False  # the edge published a cancel for this turn (at most once)
        self.first_relayed: float | None = None  # wall time the first text was handed out (schemas.timing)
        self.interrupted = False  # the edge is draining: the next wait raises Draining
        # the answer's text received so far and its token count, kept only for a turn that may be continued
        # on a fallback pool if its own dies mid-answer (edge.turns ``reroute_stranded``); None: not kept
        self.received: str | None = None
        self.received_tokens = 0

    @property
    def started(self) -> bool:
        """An event of the turn has arrived (a worker is generating it, or it ended)."""
        return bool(self._events) or self.delivered > 0 or self.done is not None

    def interrupt(self) -> None:
        """End the stream's wait now with :class:`Draining` (the edge is shutting down)."""
        self.interrupted = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def splice(self, ev: TokenEvent) -> str:
        """The part of ``ev.delta`` the client has not seen yet ('' if none)."""
        end = ev.text_offset + len(ev.delta)
        if end <= self.delivered:
            return ""
        piece = ev.delta[max(0, self.delivered - ev.text_offset) :]
        self.delivered = end
        return piece

    def put(self, ev: TokenEvent | TurnCompleted) -> None:
        """Hand the stream its next event (called by the relay)."""
        if self.received is not None and isinstance(ev, TokenEvent):
            have = len(self.received)
            if ev.text_offset <= have < ev.text_offset + len(ev.delta):  # the characters not received before
                self.received += ev.delta[have - ev.text_offset :]
            self.received_tokens = max(self.received_tokens, ev.completion_tokens)
        self._events.append(ev)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self, deadline: float, heartbeat_s: float | None, timeout_s: float) -> TokenEvent | TurnCompleted | None:
        """The next event; None when ``heartbeat_s`` passed without one. Raises TurnTimeout at ``deadline``
        (loop time) without an event."""
        loop = asyncio.get_running_loop()
        while not self._events:
            if self.interrupted:
                raise Draining(self.correlation_id)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TurnTimeout(f"no reply for turn {self.correlation_id} within {timeout_s:.0f}s")
            wait = remaining if heartbeat_s is None else min(remaining, heartbeat_s)
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout(wait):  # no task per wait, unlike asyncio.wait_for on 3.11
                    await self._waiter
            except TimeoutError:
                if heartbeat_s is not None and deadline - loop.time() > 0:
                    return None
            finally:
                self._waiter = None
        return self._events.popleft()

    async def pieces(self, timeout_s: float, heartbeat_s: float | None = None) -> AsyncIterator[str | None]:
        """Yield new text until the completion arrives (then ``self.done`` is set); with ``heartbeat_s``,
        also None after that long without an event (the edge sends an SSE comment: the stream's keep-alive
        costs no task of its own). Raises TurnTimeout after ``timeout_s`` without an event.

        Events already waiting are joined into one piece: a client that fell behind gets one SSE chunk
        instead of many (the edge's cost is per chunk, not per character).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            ev = await self._next(deadline, heartbeat_s, timeout_s)
            if ev is None:
                yield None
                continue
            deadline = loop.time() + timeout_s
            text = ""
            while True:
                if isinstance(ev, TokenEvent):
                    text += self.splice(ev)
                else:
                    self.done = ev
                    if ev.retraction is not None:  # its text is the safety message: closing_events sends it
                        break
                    if len(ev.text) > self.delivered:  # anything a lost token event did not carry
                        text += ev.text[self.delivered :]
                        self.delivered = len(ev.text)
                    break
                if not self._events:
                    break
                ev = self._events.popleft()
            if text:
                if self.first_relayed is None:
                    self.first_relayed = time.time()
                yield text
            if self.done is not None:
                return


class ReplyRelay(BackgroundService):
    task_name = "reply-relay"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.tp = TopicPartition(topic(CHAT_REPLIES, settings.topic_prefix), settings.reply_partition)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=None, auto_offset_reset="latest", fetch_max_wait_ms=5)
        self.turns: dict[str, TurnStream] = {}
        # a rerouted turn's first correlation id -> the one it was published again as, and back (the last
        # ALIASES kept: a cancel or a resume after the stream closed still finds the turn that runs)
        self.aliases: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.origins: dict[str, str] = {}
        self.relayed = 0

    async def on_start(self) -> None:
        await self.consumer.start()
        self.consumer.assign([self.tp])
        await self.consumer.seek_to_end(self.tp)
        await self.consumer.position(self.tp)  # resolve now, so no reply produced after start() is missed

    async def on_stop(self) -> None:
        await self.consumer.stop()

    def open(self, correlation_id: str) -> TurnStream:
        stream = TurnStream(correlation_id)
        self.turns[correlation_id] = stream
        return stream

    def reroute(self, correlation_id: str, new_id: str) -> None:
        """The turn ``correlation_id`` was published again as ``new_id`` (edge.routing): its stream takes the
        new turn's events, the old turn's are dropped; :meth:`close` of either id closes both."""
        stream = self.turns.pop(correlation_id, None)
        if stream is not None:
            self.turns[new_id] = stream
            self.aliases[correlation_id] = new_id
            self.origins[new_id] = correlation_id
            while len(self.aliases) > ALIASES:
                _, gone = self.aliases.popitem(last=False)
                self.origins.pop(gone, None)

    def current(self, correlation_id: str) -> str:
        """The id the turn ``correlation_id`` now runs as (itself unless it was rerouted)."""
        return self.aliases.get(correlation_id, correlation_id)

    def close(self, correlation_id: str) -> None:
        self.turns.pop(correlation_id, None)
        new_id = self.aliases.get(correlation_id)
        if new_id is not None:
            self.turns.pop(new_id, None)

    async def loop(self) -> None:
        async for record in records_forever(self.consumer, "reply relay"):
            self._dispatch(record.value)

    def _dispatch(self, raw: bytes | None) -> None:
        ev = reply_event(raw, self.turns)
        if ev is not None:
            self.turns[ev.correlation_id].put(ev)
            self.relayed += 1


def reply_event(raw: bytes | None, wanted: Container[str]) -> TokenEvent | TurnCompleted | None:
    """A reply-topic record as a token or completion event, if it belongs to a turn in ``wanted``
    (correlation ids); None otherwise. Other turns' events are dropped before paying for validation;
    undecodable ones are logged and dropped."""
    try:
        data = orjson.loads(raw or b"")
    except orjson.JSONDecodeError as exc:
        log.warning("undecodable reply event dropped: not JSON: %s", exc)
        return None
    if not isinstance(data, dict) or str(data.get("correlation_id")) not in wanted:
        return None
    try:
        ev = decode_object(data)
    except DecodeError as exc:
        log.warning("undecodable reply event dropped: %s", exc)
        return None
    return ev if isinstance(ev, TokenEvent | TurnCompleted) else None
