"""The edge's side of a turn: build and admit it, publish it to ``chat.requests``, cancel it on
``chat.control`` (a client gone, a timeout, Stop), and record it when it finishes (metrics, live stats,
the recent turns feedback may name before the recorder has stored them).

The SSE and non-streamed answers are built from the turn's :class:`edge.relay.TurnStream` by
:mod:`edge.streaming` and :mod:`edge.chat`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from core import metrics
from core.background import PeriodicService
from core.config import Settings
from core.pii import mask_messages, mask_pii, pseudonym
from core.routing import AUTO
from core.tools import INVALID_TOOL_CALL
from edge.admission import LoadMonitor, decide, refuse, unavailable_error
from edge.conversations import ConversationStore, TurnInfo
from edge.errors import APIError
from edge.live import LiveStats
from edge.relay import ReplyRelay, TurnStream
from edge.resume import TurnFinder
from edge.routing import NO_WORKER, Route, Router
from producers.feedback import FeedbackProducer
from producers.turns import TurnProducer, edge_reply_to
from schemas.errors import NotFound
from schemas.events import ChatMessage, ChatTurnRequest, Continuation, RouteInfo
from schemas.feedback import prompt_group
from schemas.openai import ChatCompletionRequest
from schemas.timing import breakdown
from topics.pools import pool_named, primary

log = logging.getLogger(__name__)

RECENT_TURNS = 4096  # finished turns remembered per edge (for feedback that outruns the recorder)


class TurnKey(Protocol):
    """What a cancel needs of a turn."""

    @property
    def correlation_id(self) -> str: ...

    @property
    def conversation_id(self) -> str: ...


@dataclass(frozen=True)
class TurnRef:
    correlation_id: str
    conversation_id: str


@dataclass(frozen=True)
class Finished:
    """A turn this edge finished recently: feedback on it is accepted before the recorder has stored it."""

    conversation_id: str
    messages: list[ChatMessage]
    model: str
    finish_reason: str
    owner: str | None = None

    def info(self, correlation_id: str) -> TurnInfo:
        masked = [{"role": m.role, "content": mask_pii(m.content)[0]} for m in self.messages]
        return TurnInfo(correlation_id, self.conversation_id, prompt_group(self.conversation_id, masked), self.model, self.finish_reason, self.owner)


def timing_ms(parts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The latency split in milliseconds, as sent to clients in the ``timing`` extra field."""
    return {group: {k: round(v * 1000, 2) for k, v in values.items()} for group, values in parts.items()}


class Heartbeat(PeriodicService):
    """This edge's heartbeat on ``chat.control`` every ``edge_heartbeat_s`` (:class:`schemas.events.EdgeHeartbeat`):
    its reply partition, and the turns of other edges it streams to resumed clients. A failed beat is logged."""

    task_name = "heartbeat"

    def __init__(self, service: ChatService) -> None:
        super().__init__()
        self.service = service
        self.every_s = service.settings.edge_heartbeat_s

    async def tick(self) -> None:
        s = self.service
        partition = s.reply_to.partition or 0
        async with asyncio.timeout(max(self.every_s, 1.0)):
            await s.bus.heartbeat(s.settings.edge_id, partition, sorted({st.correlation_id for st in s.resumed}))


class ChatService:
    """Publishes turns, cancels them, and records them when they finish."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, relay: ReplyRelay, monitor: LoadMonitor, live: LiveStats) -> None:
        self.settings = settings
        self.producer = producer
        self.relay = relay
        self.monitor = monitor
        self.live = live
        self.router = Router(settings, monitor)  # which model pool answers (edge.routing)
        # published turns of a model with a fallback, not finished yet: rerouted if its pool dies (reroute_stranded)
        self.reroutable: collections.OrderedDict[str, tuple[ChatTurnRequest, TurnStream]] = collections.OrderedDict()
        monitor.listeners.append(self.reroute_stranded)
        self.bus = TurnProducer(settings, producer)
        self.feedback = FeedbackProducer(settings, producer)
        self.reply_to = edge_reply_to(settings)
        self._background: set[asyncio.Task[None]] = set()
        self.charge: Callable[[str, int, float], Awaitable[None]] | None = None  # a finished turn's tokens to its key (edge.keys)
        self.pending_cancels: dict[str, asyncio.TimerHandle] = {}  # disconnected turns a resume may still claim
        # correlation id -> conversation id of turns this edge published and not yet saw end (for Stop)
        self.open_turns: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.owners: collections.OrderedDict[str, str | None] = collections.OrderedDict()  # turns published here -> API key identity
        self.recent: collections.OrderedDict[str, Finished] = collections.OrderedDict()
        self.finder = TurnFinder(settings)
        self.resumed: set[TurnStream] = set()  # resumed streams open on this edge
        self.draining = False

    def drain(self) -> int:
        """Shutting down: admit nothing more and end every open stream with its resume id
        (:mod:`edge.streaming`); the turns go on for a client that resumes elsewhere. Returns the streams ended."""
        if self.draining:
            return 0
        self.draining = True
        streams = [*self.relay.turns.values(), *self.resumed]
        for stream in streams:
            stream.interrupt()
        log.info("edge %s draining: %d open streams told to resume elsewhere", self.settings.edge_id, len(streams))
        return len(streams)

    async def route(self, req: ChatCompletionRequest) -> Route:
        """The model pool that answers ``req`` (:mod:`edge.routing`): 404 for a model not served, 503 when
        neither it nor its fallback can take turns. ``auto`` embeds the last user message (in a thread) for
        the router's classifier."""
        messages = req.chat_messages()
        p_primary = None
        if req.model == AUTO and len(self.router.pools) > 1:
            p_primary = await asyncio.to_thread(self.router.p_primary, messages)
        return self.router.route(req.model, messages, p_primary)

    def build_turn(
        self, req: ChatCompletionRequest, received_at: float, owner: str | None = None, tenant: str | None = None, route: Route | None = None
    ) -> ChatTurnRequest:
        route = route or self.router.route(req.model, req.chat_messages())
        messages, pii = mask_messages(req.chat_messages())  # no topic holds a raw prompt (core.pii)
        tools, tool_choice = req.offered_tools()
        turn = ChatTurnRequest(
            correlation_id=f"chatcmpl-{uuid.uuid4().hex}",
            conversation_id=req.conversation_id or f"conv-{uuid.uuid4().hex}",
            model=route.pool.name,
            route=route.info,
            messages=messages,
            sampling=req.sampling(self.settings.default_max_tokens),
            reply_to=self.reply_to,
            user=pseudonym(req.user, self.settings.pseudonym_key_bytes()),
            pii=pii,
            owner=owner,
            tenant=tenant,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
        )
        turn.mark("edge_received", received_at)
        return turn

    def admit(self, turn: ChatTurnRequest) -> dict[str, str]:
        """Admission control (:mod:`edge.admission`): raises a 429, or returns headers for the response
        (``X-Chatbus-Brownout`` when ``max_tokens`` was capped)."""
        if self.draining:
            raise unavailable_error(f"{self.settings.edge_id} is shutting down; send the request to another edge", 1)
        pool = pool_named(self.settings, turn.model) or primary(self.settings)
        down = self.monitor.unavailable("interactive", pool.group.group_id)
        if down is not None:
            raise down
        load = self.monitor.snapshot(len(self.relay.turns))
        decision = decide(load, self.settings, "interactive", turn.sampling.max_tokens)
        if not decision.admit:
            self.live.rejected("interactive")
            raise refuse(decision, "interactive", load, self.settings, self.monitor)
        self.monitor.admitted()
        if decision.max_tokens is not None and decision.max_tokens < turn.sampling.max_tokens:
            turn.sampling.max_tokens = decision.max_tokens
            metrics.BROWNOUT_CAPPED.inc()
            return {"X-Chatbus-Brownout": f"max_tokens={decision.max_tokens}"}
        return {}

    def finished(self, turn: ChatTurnRequest, stream: TurnStream) -> dict[str, dict[str, float]]:
        """Record a finished turn's metrics; returns its latency split (:func:`schemas.timing.breakdown`)."""
        done = stream.done
        assert done is not None
        stages = {**turn.stages, **done.stages, "last_relayed": time.time()}
        if stream.first_relayed is not None:
            stages["first_relayed"] = stream.first_relayed
        parts = breakdown(stages)
        model = turn.model
        self.router.record(model, done.finish_reason != "error" or (done.error or "").startswith(INVALID_TOOL_CALL))  # a bad call is no pool failure
        metrics.REQUEST_SUCCESS.labels(model, done.finish_reason).inc()
        metrics.EDGE_GENERATION_TOKENS.labels(model).inc(done.usage.completion_tokens)
        totals = parts["totals"]
        if "ttft" in totals and done.finish_reason in ("stop", "length"):
            metrics.TTFT.labels(model).observe(totals["ttft"])
        if "e2e" in totals:
            metrics.E2E.labels(model).observe(totals["e2e"])
        for name, seconds in parts["stages"].items():
            metrics.TURN_STAGE.labels(name).observe(seconds)
        for name, seconds in parts["hops"].items():
            metrics.TURN_HOP.labels(name).observe(seconds)
        self.live.turn(done.finish_reason, parts, done.usage.completion_tokens)
        self.monitor.turn_finished()
        if self.charge is not None and turn.owner and done.usage.total_tokens:
            self.in_background(self._charged(turn.owner, done.usage.total_tokens))
        self.open_turns.pop(turn.correlation_id, None)
        self.recent[turn.correlation_id] = Finished(turn.conversation_id, turn.messages, done.model or turn.model, done.finish_reason, turn.owner)
        while len(self.recent) > RECENT_TURNS:
            self.recent.popitem(last=False)
        return parts

    async def publish(self, turn: ChatTurnRequest) -> TurnStream:
        turn.mark("edge_published")
        record = self.bus.request(turn)  # validated input always serialises; do it before anything is opened
        stream = self.relay.open(turn.correlation_id)
        self.open_turns[turn.correlation_id] = turn.conversation_id
        self.owners[turn.correlation_id] = turn.owner
        while len(self.open_turns) > RECENT_TURNS:  # turns abandoned without an end are forgotten, oldest first
            self.open_turns.popitem(last=False)
        while len(self.owners) > 2 * RECENT_TURNS:
            self.owners.popitem(last=False)
        try:
            async with asyncio.timeout(self.settings.publish_timeout_s):
                await self.bus.send(record)
        except Exception as exc:
            self.relay.close(turn.correlation_id)
            self.open_turns.pop(turn.correlation_id, None)
            log.warning("publishing turn %s failed: %s", turn.correlation_id, type(exc).__name__)
            if isinstance(exc, TimeoutError):
                # the request may still reach the bus once the broker answers: make sure it is not generated
                self.cancel_soon(TurnRef(turn.correlation_id, turn.conversation_id), "publish_timeout", stream)
            raise unavailable_error("the message bus did not acknowledge the turn", 5) from exc
        if turn.source == "interactive" and turn.model in self.router.fallbacks:
            self.reroutable[turn.correlation_id] = (turn, stream)
            if not turn.tools:
                stream.received = ""  # keep the answer's text: the fallback continues it if the pool dies mid-answer
            while len(self.reroutable) > RECENT_TURNS:
                self.reroutable.popitem(last=False)
        return stream

    def reroute_stranded(self) -> None:
        """After each load reading: the unfinished turns this edge published to a pool that now has no live
        worker are published again to the pool's fallback (a new correlation id; the client's stream follows
        it) and the first is cancelled, so a worker of the pool coming back skips it (cancels are durable).
        A turn whose answer had begun streaming goes with that text as its :class:`Continuation`: the
        fallback's model continues it and the client's stream goes on where it stopped (with ``max_tokens``
        less what was generated). A begun turn offering tools is not moved (its calls are held back, so
        there is no text to continue from): it waits for its pool. Without this every stranded turn would
        wait in the dead pool's topic until the pool came back or the turn timed out."""
        for cid, (turn, stream) in list(self.reroutable.items()):
            if stream.done is not None or cid not in self.relay.turns or (stream.started and stream.received is None):
                del self.reroutable[cid]
                continue
            pool = pool_named(self.settings, turn.model)
            if pool is None or self.router.why_not(pool) != NO_WORKER:
                continue
            try:
                route = self.router.route(turn.model, turn.messages)
            except APIError:
                continue  # no fallback can take it now: it waits (or times out) where it is
            del self.reroutable[cid]
            self.in_background(self._republish(turn, stream, route))

    async def _republish(self, turn: ChatTurnRequest, stream: TurnStream, route: Route) -> None:
        first = TurnRef(turn.correlation_id, turn.conversation_id)
        update: dict[str, Any] = {"correlation_id": f"chatcmpl-{uuid.uuid4().hex}", "model": route.pool.name, "route": route.info}
        # what the client has or is about to get of the answer, read with the reroute below (no await between:
        # nothing of the first turn arrives after it is read, and nothing is relayed from it after the reroute)
        if stream.received:
            used = stream.received_tokens
            update["continuation"] = Continuation(text=stream.received, completion_tokens=used)
            update["sampling"] = turn.sampling.model_copy(update={"max_tokens": max(1, turn.sampling.max_tokens - used)})
            update["route"] = RouteInfo(requested=route.requested, reason=route.reason, fallback_from=route.fallback_from, continued_after=len(stream.received))
        again = turn.model_copy(deep=True, update=update)
        record = self.bus.request(again)
        self.relay.reroute(turn.correlation_id, again.correlation_id)
        turn.model, turn.route = again.model, again.route  # the answer names the model that gave it (and since where)
        try:
            async with asyncio.timeout(self.settings.publish_timeout_s):
                await self.bus.send(record)
            log.info("turn %s rerouted to %s as %s: %s", first.correlation_id, route.pool.name, again.correlation_id, route.reason)
        except Exception as exc:
            log.warning("rerouting turn %s failed: %s", first.correlation_id, type(exc).__name__)
        await self.cancel(first, "rerouted")

    async def cancel(self, turn: TurnKey, reason: str, stream: TurnStream | None = None) -> None:
        """Publish ``chat.turn.cancel`` for the turn (once per stream)."""
        if stream is not None:
            if stream.cancel_sent:
                return
            stream.cancel_sent = True
        try:
            await self.bus.cancel(turn.correlation_id, turn.conversation_id, reason)
            log.info("turn %s cancelled: %s", turn.correlation_id, reason)
            rerouted = self.relay.aliases.get(turn.correlation_id) if reason != "rerouted" else None
            if rerouted is not None:  # the turn was published again (reroute_stranded): stop that one too
                await self.bus.cancel(rerouted, turn.conversation_id, reason)
        except Exception:
            log.exception("could not publish cancel for %s", turn.correlation_id)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task kept alive until it ends (from code that cannot await, e.g. a closing stream)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _charged(self, owner: str, tokens: int) -> None:
        assert self.charge is not None
        try:
            await self.charge(owner, tokens, time.time())
        except Exception as exc:  # the database down: that turn goes uncharged (the README's error bound)
            log.warning("could not charge %d tokens to %s: %s: %s", tokens, owner, type(exc).__name__, exc)

    def cancel_soon(self, turn: TurnKey, reason: str, stream: TurnStream) -> None:
        """Publish a cancel from a context that cannot await (a closing generator); the task is kept alive."""
        self.in_background(self.cancel(turn, reason, stream))

    def cancel_unless_resumed(self, turn: TurnKey, stream: TurnStream) -> None:
        """A client left mid-turn: cancel it after ``resume_grace_s`` unless a client resumes it first
        (:meth:`claim`); at once when the grace is 0."""
        cid = turn.correlation_id
        if stream.cancel_sent or cid in self.pending_cancels:
            return
        if self.settings.resume_grace_s <= 0:
            self.cancel_soon(turn, "client_disconnected", stream)
            return

        def fire() -> None:
            if self.pending_cancels.pop(cid, None) is not None:
                self.cancel_soon(turn, "client_disconnected", stream)

        self.pending_cancels[cid] = asyncio.get_running_loop().call_later(self.settings.resume_grace_s, fire)

    def claim(self, cid: str) -> None:
        """A client resumed (or stopped) the turn: the cancel pending since its last client left is off."""
        pending = self.pending_cancels.pop(cid, None) or self.pending_cancels.pop(self.relay.origins.get(cid, ""), None)
        if pending is not None:  # (a resumed rerouted turn is claimed as the turn it runs as: its pending cancel is the first id's)
            pending.cancel()

    async def stop(self, cid: str, conversations: ConversationStore, owner: str | None = None) -> dict[str, Any]:
        """The chat page's Stop: publish ``chat.turn.cancel`` now (no resume grace). The turn may be relayed
        by any edge; its conversation id (the cancel's key) comes from this edge or the database.
        404 if the turn is unknown or (``owner`` given) another API key's; ``cancelled: false`` if it had
        already finished."""
        missing = NotFound(f"No chat completion found with id '{cid}'.", type="NotFoundError", param="completion_id")
        conversation = self.open_turns.get(cid)
        if conversation is not None and owner is not None and self.owners.get(cid) != owner:
            raise missing
        if conversation is None:
            recent = self.recent.get(cid)
            if recent is not None:
                if owner is not None and recent.owner != owner:
                    raise missing
                return {"id": cid, "object": "chat.completion.cancel", "cancelled": False}
            state = await conversations.turn_state(cid)
            if state is None or (owner is not None and state[2] != owner):
                raise missing
            conversation, answered, _ = state
            if answered:
                return {"id": cid, "object": "chat.completion.cancel", "cancelled": False}
        self.claim(cid)
        await self.cancel(TurnRef(cid, conversation), "stopped_by_user", self.relay.turns.get(cid))
        return {"id": cid, "object": "chat.completion.cancel", "cancelled": True}

    async def known(self, cid: str, since_ms: int, owner: str | None = None) -> bool:
        """Whether ``cid`` is a turn that exists (and, ``owner`` given, is that API key's): one this edge
        published, else one on ``chat.requests`` after ``since_ms`` (:class:`edge.resume.TurnFinder`).
        503 if the bus does not answer."""
        if cid in self.owners:
            return owner is None or self.owners[cid] == owner
        if cid in self.open_turns or cid in self.recent or cid in self.relay.turns or cid in self.pending_cancels:
            return owner is None
        try:
            found, turn_owner = await self.finder.published(cid, since_ms)
        except Exception as exc:
            log.warning("could not look up turn %s: %s", cid, type(exc).__name__)
            raise unavailable_error("the message bus did not answer", 5) from exc
        return found and (owner is None or turn_owner == owner)

    async def turn_info(self, cid: str, conversations: ConversationStore, owner: str | None = None) -> TurnInfo | None:
        """A completed turn: one this edge finished, else one the recorder stored; None if unknown or
        (``owner`` given) another API key's."""
        recent = self.recent.get(cid)
        info = recent.info(cid) if recent is not None else await conversations.turn(cid)
        if info is None or (owner is not None and info.owner != owner):
            return None
        return info
