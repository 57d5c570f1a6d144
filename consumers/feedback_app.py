"""The feedback app (faust-streaming): joins votes with the turns they rate and curates the preference dataset.

Run by ``chatbus worker feedback``. Faust app id ``<prefix>chatbus-feedback`` (also its consumer group and the
prefix of its internal topics); every bus topic name goes through :func:`topics.registry.topic`.

Topology (``P`` = the topic prefix, ``A`` = the app id)::

    P chat.replies (8, per edge)  --repartition-->  A-completions (6, key conversation id)
    P chat.screened (6) ----------+
    P chat.feedback (6) ----------+--> joiner (tables: turns, groups, votes, preferences; 6 partitions)
    A-completions (6) ------------+          |  one message per prompt group whose state changed
                                             v
                                    A-candidates (1 partition) --> curator (tables: prompts, emitted,
                                                                     group_records; 1 partition)
                                             |
                 P dpo.pairs / P kto.examples (key record id; a null value retracts) + MongoDB

* **repartition** (agent on ``chat.replies``, which is partitioned by edge, not by key): keeps
  ``chat.turn.completed`` events of interactive turns — token events are skipped on ``event_type``
  before any validation — and forwards their bytes unchanged to ``A-completions``, keyed by
  conversation id, so completions are co-partitioned with ``chat.screened`` and ``chat.feedback``.
* **joiner** (one agent over the three co-partitioned 6-partition topics). Faust writes a table change
  to the changelog partition of the *event being processed*, and all three inputs put a conversation on
  the same partition, so each conversation's state lives in one partition of each table:

  - ``turns``: correlation id → :class:`consumers.curation.TurnState` (masked prompt, prompt group and
    verdict from ``chat.screened``; text, finish reason, model and verdict from the completion);
  - ``groups``: prompt group → ``{conversation_id, responses: [correlation ids], feedback: bool}``;
  - ``votes``: response id → the latest rating (:class:`consumers.curation.Vote`) — an event with an
    older ``created_at`` never overwrites a newer one; ``rating: null`` is kept as a withdrawal (so a
    late, older vote cannot revive the rating);
  - ``preferences``: prompt group → the latest explicit preference.

  Events arrive in any order (a vote may come before its completion): every part is buffered in the
  tables and each event re-evaluates the prompt groups it touches (:func:`consumers.curation.build_group`).
  A group that has had feedback sends its complete current set of records and drops to ``A-candidates``.
  Each vote is also upserted into MongoDB ``feedback`` (``_id`` = feedback id, latest ``created_at`` wins).
* **curator** (one agent, ``A-candidates`` has 1 partition so it sees every group: dedup needs global
  state). Tables (1 partition): ``prompts`` (prompt group → MinHash values and the canonical group it
  duplicates, :class:`consumers.curation.PromptDeduper`; the in-memory LSH index is rebuilt from this
  table on first use after a start), ``emitted`` (record id → digest of what was last published, so an
  unchanged record is not sent again) and ``group_records`` (prompt group → ``{record id: kind}``
  emitted, to retract what no longer holds). It publishes :class:`schemas.feedback.DpoPair` /
  :class:`schemas.feedback.KtoExample` JSON to ``dpo.pairs`` / ``kto.examples`` (key: record id) and
  replaces MongoDB ``dpo_pairs`` / ``kto_examples`` documents (``_id`` = record id); a retraction is a
  tombstone (null value) and a delete. Drops are upserted into ``curation_drops`` (``_id`` = record id,
  ``reason``) and removed once the record is emitted.

State: tables use ``store="memory://"``: after a (re)start faust rebuilds them from the compacted
``A-<table>-changelog`` topics before any agent runs. Source offsets are committed by faust after
events are processed.

Guarantee: **at-least-once**, idempotent. Every output is sent with ``send_and_wait`` (acknowledged
before the next event); replaying an event rewrites the same table values, record ids and documents.
A malformed event (not JSON, wrong shape, a handler error) becomes a :class:`schemas.events.DeadLetter`
on ``chat.dlq`` (``worker="feedback"``) and processing moves on. A **database or broker outage** is
different: the write is retried with capped exponential back-off (tenacity) for as long as it takes,
holding the agent on that event (faust keeps heartbeating, so the partition stays here; no offset past
it is committed). We chose blocking over raising because faust has no per-event redelivery: an
exception escaping an agent crashes it, which would only re-read from the last commit after a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import faust
import orjson
from aiokafka.errors import KafkaError
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from consumers.curation import Preference, PromptDeduper, TurnState, Vote, build_group, normalise_prompt, record_digest
from core import metrics
from core.config import Settings
from producers.bus import dead_letter
from schemas.events import DecodeError, ScreenedTurn, TurnCompleted, decode_object
from schemas.feedback import (
    RECORD_COLLECTIONS,
    CandidateDrop,
    CandidateRecord,
    CurationCandidate,
    DpoPair,
    FeedbackEvent,
    KtoExample,
    decode_feedback,
    prompt_group,
    record_document,
)
from topics.clients import create_missing_topics
from topics.registry import CHAT_DLQ, CHAT_FEEDBACK, CHAT_REPLIES, CHAT_SCREENED, DAY_MS, DPO_PAIRS, KTO_EXAMPLES, topic

log = logging.getLogger(__name__)
T = TypeVar("T")

APP_NAME = "chatbus-feedback"
JOIN_PARTITIONS = 6  # chat.screened and chat.feedback have 6; the completions repartition topic too
OUTPUTS = {"dpo": (DPO_PAIRS, RECORD_COLLECTIONS["dpo"]), "kto": (KTO_EXAMPLES, RECORD_COLLECTIONS["kto"])}
# table -> partitions: the joiner's are co-partitioned with its sources, the curator's with A-candidates
TABLES = {
    "turns": JOIN_PARTITIONS,
    "groups": JOIN_PARTITIONS,
    "votes": JOIN_PARTITIONS,
    "preferences": JOIN_PARTITIONS,
    "prompts": 1,
    "emitted": 1,
    "group_records": 1,
}


def app_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}{APP_NAME}"


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, PyMongoError) or (isinstance(exc, KafkaError) and bool(exc.retriable))


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("feedback: %s unavailable (%s); retry %d in %.1fs", state.kwargs.get("what", "dependency"), exc, state.attempt_number, state.upcoming_sleep)


async def retry_forever(fn: Callable[[], Awaitable[T]], what: str) -> T:
    """``fn()`` until it succeeds; database and retriable broker errors are retried with back-off (≤ 10 s)."""
    async for attempt in AsyncRetrying(retry=retry_if_exception(_transient), wait=wait_exponential(0.2, max=10), before_sleep=_log_retry, reraise=True):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")  # pragma: no cover


class FeedbackApp:
    """The faust app, its topics, tables and agents (see the module docstring). ``app.main()`` is not used:
    :func:`run` starts a :class:`faust.Worker` on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        p = settings.topic_prefix
        self.id = app_id(settings)
        self.completions_name = f"{self.id}-completions"
        self.candidates_name = f"{self.id}-candidates"
        self.dlq_name = topic(CHAT_DLQ, p)
        self.app = faust.App(
            self.id,
            broker=[f"kafka://{h.strip()}" for h in settings.kafka_bootstrap.split(",")],
            store="memory://",
            topic_partitions=JOIN_PARTITIONS,
            topic_replication_factor=settings.kafka_replication_factor,
            table_standby_replicas=0,
            web_enabled=False,
            datadir=str(settings.state_dir / "faust"),
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            producer_acks=-1,
            stream_wait_empty=False,
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.replies = self.app.topic(topic(CHAT_REPLIES, p), **raw)  # type: ignore[arg-type]
        self.joined = self.app.topic(topic(CHAT_SCREENED, p), topic(CHAT_FEEDBACK, p), self.completions_name, **raw)  # type: ignore[arg-type]
        self.candidates = self.app.topic(self.candidates_name, **raw)  # type: ignore[arg-type]
        self.screened_name = topic(CHAT_SCREENED, p)
        self.feedback_name = topic(CHAT_FEEDBACK, p)
        # values are JSON objects: no value_type (faust would expect a faust.Record and fail recovery)
        tables = {name: self.app.Table(name, default=None, partitions=parts, key_type=str) for name, parts in TABLES.items()}
        self.turns, self.groups, self.votes, self.preferences = (tables[n] for n in ("turns", "groups", "votes", "preferences"))
        self.prompts, self.emitted, self.group_records = tables["prompts"], tables["emitted"], tables["group_records"]
        self._deduper: PromptDeduper | None = None
        self._db: AsyncDatabase[dict[str, Any]] | None = None
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self.app.agent(self.replies, name=f"{self.id}.repartition")(self._repartition)
        self.app.agent(self.joined, name=f"{self.id}.joiner")(self._joiner)
        self.app.agent(self.candidates, name=f"{self.id}.curator")(self._curator)

    # --- plumbing ------------------------------------------------------------------------------------------
    @property
    def db(self) -> AsyncDatabase[dict[str, Any]]:
        if self._db is None:  # created on the worker's loop, on first use
            self._client = AsyncMongoClient(self.settings.mongo_uri, serverSelectionTimeoutMS=5_000)
            self._db = self._client[self.settings.mongo_db]
        return self._db

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def send(self, name: str, key: bytes | None, value: bytes | None, what: str = "kafka") -> None:
        await retry_forever(lambda: self.app.producer.send_and_wait(name, key, value, None, None, None), what)

    async def dead_letter(self, message: Any, reason: str) -> None:
        log.warning("feedback: dead-lettering %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason)
        letter = dead_letter(self.settings, message, "feedback", reason)
        await self.send(letter.topic, letter.key, letter.value)

    async def _each(self, stream: faust.StreamT[bytes], handle: Callable[[Any], Awaitable[None]]) -> None:
        """Run ``handle(message)`` per event; a bad event is dead-lettered, never fatal."""
        async for event in stream.events():
            message = event.message
            try:
                await handle(message)
            except DecodeError as exc:
                await self.dead_letter(message, str(exc))
            except Exception as exc:
                log.exception("feedback: handler failed on %s[%d]@%d", message.topic, message.partition, message.offset)
                await self.dead_letter(message, f"{type(exc).__name__}: {exc}")

    # --- repartition ------------------------------------------------------------------------------------------
    async def _repartition(self, stream: faust.StreamT[bytes]) -> None:
        await self._each(stream, self.repartition_one)

    async def repartition_one(self, message: Any) -> None:
        try:
            data = orjson.loads(message.value) if message.value is not None else None
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("event_type") != "chat.turn.completed":
            return  # token events (most of the topic) and anything else: not ours to judge
        event = decode_object(data)
        assert isinstance(event, TurnCompleted)
        if event.batch is not None:
            return
        await self.send(self.completions_name, event.key, message.value)

    # --- joiner ---------------------------------------------------------------------------------------------
    async def _joiner(self, stream: faust.StreamT[bytes]) -> None:
        await self._each(stream, self.join_one)

    async def join_one(self, message: Any) -> None:
        if message.topic == self.feedback_name:
            await self.on_feedback(decode_feedback(message.value))
            return
        if message.value is None:
            raise DecodeError("empty message (tombstone)")
        try:
            data = orjson.loads(message.value)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not JSON: {exc}") from None
        event = decode_object(data)
        if message.topic == self.screened_name:
            if not isinstance(event, ScreenedTurn):
                raise DecodeError(f"expected chat.turn.screened, got {type(event).__name__}")
            await self.on_screened(event)
        elif isinstance(event, TurnCompleted):
            await self.on_completed(event)
        else:
            raise DecodeError(f"expected chat.turn.completed, got {type(event).__name__}")

    def _turn(self, cid: str, conversation_id: str) -> TurnState:
        current = self.turns.get(cid)
        turn: TurnState = dict(current) if current else {"correlation_id": cid, "conversation_id": conversation_id, "flags": []}  # type: ignore[assignment]
        return turn

    @staticmethod
    def _merge_verdict(turn: TurnState, allowed: bool, flags: list[str]) -> None:
        turn["allowed"] = allowed and turn.get("allowed") is not False
        turn["flags"] = sorted(set(turn.get("flags") or []) | set(flags))

    def _add_to_group(self, pg: str, conversation_id: str, response_ids: list[str], feedback: bool = False) -> None:
        current = self.groups.get(pg) or {"conversation_id": conversation_id, "responses": [], "feedback": False}
        responses = list(current["responses"])
        changed = False
        for rid in response_ids:
            if rid not in responses:
                responses.append(rid)
                changed = True
        if changed or (feedback and not current["feedback"]):
            self.groups[pg] = {**current, "responses": responses, "feedback": bool(current["feedback"] or feedback)}

    async def on_screened(self, event: ScreenedTurn) -> None:
        cid = event.correlation_id
        turn = self._turn(cid, event.conversation_id)
        pg = prompt_group(event.conversation_id, event.request.messages)
        turn["prompt"] = [m.model_dump() for m in event.request.messages]
        turn["prompt_group"] = pg
        turn.setdefault("model", event.request.model)
        self._merge_verdict(turn, event.verdict.allowed, event.verdict.flags)
        self.turns[cid] = turn
        self._add_to_group(pg, event.conversation_id, [cid])
        await self.reevaluate(self._groups_of(cid))

    async def on_completed(self, event: TurnCompleted) -> None:
        cid = event.correlation_id
        turn = self._turn(cid, event.conversation_id)
        turn["text"] = event.text
        turn["finish_reason"] = event.finish_reason
        turn["model"] = event.model
        if event.verdict is not None:
            self._merge_verdict(turn, event.verdict.allowed, event.verdict.flags)
        self.turns[cid] = turn
        pg = turn.get("prompt_group")
        if pg:
            self._add_to_group(pg, event.conversation_id, [cid])
        await self.reevaluate(self._groups_of(cid))

    async def on_feedback(self, event: FeedbackEvent) -> None:
        await retry_forever(lambda: self.save_feedback(event), "mongodb")
        pg = event.prompt_group
        if event.kind == "rating":
            rid = str(event.response_id)
            previous = self.votes.get(rid)
            if previous is None or float(previous.get("created_at", 0.0)) <= event.created_at:
                vote: Vote = {
                    "feedback_id": event.feedback_id,
                    "response_id": rid,
                    "conversation_id": event.conversation_id,
                    "prompt_group": pg,
                    "rating": event.rating,
                    "reason": event.reason,
                    "comment": event.comment,
                    "user": event.user,
                    "model": event.model,
                    "created_at": event.created_at,
                }
                self.votes[rid] = vote
            self._add_to_group(pg, event.conversation_id, [rid], feedback=True)
            await self.reevaluate({pg} | self._groups_of(rid))
            return
        previous = self.preferences.get(pg)
        if previous is None or float(previous.get("created_at", 0.0)) <= event.created_at:
            preference: Preference = {
                "feedback_id": event.feedback_id,
                "conversation_id": event.conversation_id,
                "prompt_group": pg,
                "chosen_id": str(event.chosen_id),
                "rejected_ids": list(event.rejected_ids),
                "user": event.user,
                "model": event.model,
                "created_at": event.created_at,
            }
            self.preferences[pg] = preference
        self._add_to_group(pg, event.conversation_id, [str(event.chosen_id), *event.rejected_ids], feedback=True)
        await self.reevaluate({pg})

    async def save_feedback(self, event: FeedbackEvent) -> None:
        """The latest vote per feedback id in ``feedback`` (an older event never replaces a newer one)."""
        current = await self.db.feedback.find_one({"_id": event.feedback_id}, {"created_at": 1})
        if current is not None and float(current.get("created_at", 0.0)) > event.created_at:
            return
        doc = {**event.model_dump(mode="json"), "_id": event.feedback_id, "updated_at": time.time()}
        await self.db.feedback.replace_one({"_id": event.feedback_id}, doc, upsert=True)

    def _groups_of(self, response_id: str) -> set[str]:
        """The prompt groups a response is filed under: its turn's, and the one its vote named."""
        found: set[str] = set()
        turn = self.turns.get(response_id)
        if turn and turn.get("prompt_group"):
            found.add(turn["prompt_group"])
        vote = self.votes.get(response_id)
        if vote and vote.get("prompt_group"):
            found.add(vote["prompt_group"])
        return found

    async def reevaluate(self, groups: set[str]) -> None:
        for pg in sorted(groups):
            group = self.groups.get(pg)
            if not group or not group.get("feedback"):
                continue  # no one voted in this group: nothing to curate (most turns)
            turns: dict[str, TurnState] = {}
            votes: dict[str, Vote] = {}
            for cid in group["responses"]:
                turn = self.turns.get(cid)
                if turn and turn.get("prompt_group") not in (None, pg):
                    continue  # a vote that named the wrong group: the response belongs elsewhere
                if turn:
                    turns[cid] = turn
                vote = self.votes.get(cid)
                if vote and (vote.get("prompt_group") == pg or (turn and turn.get("prompt_group") == pg)):
                    votes[cid] = vote
            result = build_group(pg, turns, votes, self.preferences.get(pg))
            candidate = CurationCandidate(
                prompt_group=pg,
                conversation_id=group.get("conversation_id", ""),
                prompt=result.prompt,
                records=[CandidateRecord(kind="dpo" if r.event_type == "dpo.pair" else "kto", record=r.model_dump(mode="json")) for r in result.records],
                drops=[CandidateDrop.model_validate(d.to_dict()) for d in result.drops],
                pending=result.pending,
            )
            await self.send(self.candidates_name, pg.encode(), candidate.to_bytes())

    # --- curator --------------------------------------------------------------------------------------------
    async def _curator(self, stream: faust.StreamT[bytes]) -> None:
        await self._each(stream, self.curate_one)

    def deduper(self) -> PromptDeduper:
        """The LSH index, rebuilt from the ``prompts`` table on first use (tables are recovered by then)."""
        if self._deduper is None:
            self._deduper = PromptDeduper()
            self._deduper.restore((pg, v["hashvalues"], v.get("duplicate_of")) for pg, v in self.prompts.items())
            log.info("feedback: dedup index rebuilt from %d prompt groups", len(self.prompts))
        return self._deduper

    async def curate_one(self, message: Any) -> None:
        candidate = CurationCandidate.from_bytes(message.value)
        pg = candidate.prompt_group
        records = candidate.records
        drops = candidate.drops
        entry = self.prompts.get(pg)
        if entry is None and candidate.prompt:
            values, duplicate_of = self.deduper().classify(pg, normalise_prompt(candidate.prompt))
            entry = {"hashvalues": values, "duplicate_of": duplicate_of}
            self.prompts[pg] = entry
            if duplicate_of:
                log.info("feedback: prompt group %s duplicates %s; its records are dropped", pg, duplicate_of)
        if entry is not None and entry.get("duplicate_of"):
            reason = f"near_duplicate_prompt:{entry['duplicate_of']}"
            drops = drops + [
                CandidateDrop(record_id=r.record["record_id"], kind=r.kind, reason=reason, prompt_group=pg, conversation_id=candidate.conversation_id)
                for r in records
            ]
            records = []
        previous: dict[str, str] = dict(self.group_records.get(pg) or {})
        current = {r.record["record_id"]: r for r in records}
        for rid, kind in sorted(previous.items()):
            if rid not in current:
                await self.retract(rid, kind)
        for rid, r in current.items():
            await self.publish(rid, r.kind, r.record)
        for drop in drops:
            if drop.record_id not in current:
                await retry_forever(functools.partial(self.save_drop, drop.model_dump(exclude_unset=True)), "mongodb")
        if previous.keys() != current.keys():
            self.group_records[pg] = {rid: r.kind for rid, r in current.items()}

    async def publish(self, rid: str, kind: str, record: dict[str, Any]) -> None:
        model = DpoPair.model_validate(record) if kind == "dpo" else KtoExample.model_validate(record)
        digest = record_digest(model)
        if (self.emitted.get(rid) or {}).get("digest") == digest:
            return
        name, collection = OUTPUTS[kind]
        await self.send(topic(name, self.settings.topic_prefix), rid.encode(), model.to_bytes())
        doc = record_document(model)

        async def write() -> None:
            await self.db[collection].replace_one({"_id": rid}, doc, upsert=True)
            await self.db.curation_drops.delete_one({"_id": rid})

        await retry_forever(write, "mongodb")
        self.emitted[rid] = {"digest": digest, "kind": kind}
        metrics.FEEDBACK_RECORDS.labels(kind, "emitted").inc()

    async def retract(self, rid: str, kind: str) -> None:
        name, collection = OUTPUTS[kind]
        await self.send(topic(name, self.settings.topic_prefix), rid.encode(), None)
        await retry_forever(lambda: self.db[collection].delete_one({"_id": rid}), "mongodb")
        if self.emitted.get(rid) is not None:
            del self.emitted[rid]
        metrics.FEEDBACK_RECORDS.labels(kind, "retracted").inc()

    async def save_drop(self, drop: dict[str, Any]) -> None:
        current = await self.db.curation_drops.find_one({"_id": drop["record_id"]}, {"reason": 1})
        if current is not None and current.get("reason") == drop["reason"]:
            return
        await self.db.curation_drops.replace_one({"_id": drop["record_id"]}, {**drop, "_id": drop["record_id"], "updated_at": time.time()}, upsert=True)
        metrics.FEEDBACK_RECORDS.labels(drop["kind"], "dropped").inc()


async def declare_internal_topics(settings: Settings) -> list[str]:
    """Create the app's own topics if missing, before faust starts: ``A-completions`` (6 partitions),
    ``A-candidates`` (1) and every table's compacted ``A-<table>-changelog`` (the table's partitions).
    Faust would create the changelogs itself, but on a first start its consumer's metadata can miss a
    just-created one and it then refuses writes to that table. Returns the names created."""
    aid = app_id(settings)
    week = {"retention.ms": str(7 * DAY_MS)}
    wanted = {f"{aid}-completions": (JOIN_PARTITIONS, week), f"{aid}-candidates": (1, week)}
    wanted |= {f"{aid}-{name}-changelog": (parts, {"cleanup.policy": "compact"}) for name, parts in TABLES.items()}
    return await create_missing_topics(settings, wanted)


def run(settings: Settings) -> None:
    """Run the feedback app until SIGTERM/SIGINT (``chatbus worker feedback``)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    created = loop.run_until_complete(declare_internal_topics(settings))
    if created:
        log.info("feedback: created %s", ", ".join(created))
    app = FeedbackApp(settings)
    worker = faust.Worker(app.app, loop=loop, loglevel=settings.log_level.lower(), quiet=True, override_logging=False, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        if not loop.is_closed():
            loop.run_until_complete(app.close())
