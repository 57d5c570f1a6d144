"""Admission control at the edge: admit a turn only while the pipeline can take it, else a fast 429.

Two signals, both cheap:

* **in-flight**: the turns this edge is waiting on (streamed or not), known exactly;
* **consumer lag** of the interactive lane: records of ``chat.requests``, ``chat.screened`` and
  ``chat.grounded`` not yet committed by the safety, retrieval and inference groups
  (:mod:`topics.lag`; inference commits a turn when it finishes, so its lag counts running turns too).
  A :class:`LoadMonitor` reads it every ``admit_poll_s``; turns this edge admitted since the last
  read are added, so a burst between two reads cannot overshoot the bound.

:func:`decide` (pure) turns a :class:`Load` into a :class:`Decision`:

* interactive: admitted while ``load < 1`` where ``load = max(inflight / admit_max_inflight,
  lag / admit_max_lag)``; past that, with ``brownout_max_tokens > 0``, admitted with ``max_tokens``
  capped (up to ``brownout_limit`` x the bounds), otherwise refused;
* batch (``POST /v1/batches``, ``n`` lines): refused first — from ``load >= batch_shed_at`` or when
  the batch lane's backlog plus ``n`` passes ``max_batch_backlog``.

A refusal is HTTP 429 with ``Retry-After`` (seconds, RFC 9110 §10.2.3) estimated as the excess over
the bound divided by the rate this edge sees turns finish (at least 1 s, at most 60 s for turns,
600 s for batches), and OpenAI's error JSON (``type: "rate_limit_error"``, which the ``openai``
client raises as ``RateLimitError``). Nothing is published for a refused request. If lag cannot be
read (broker trouble), the last reading ages out after 10 s and only the in-flight bound applies.

Availability (:meth:`LoadMonitor.unavailable`), checked before the load: while the broker does not
answer a reading within ``bus_timeout_s`` (for ``bus_stale_s``), or while a stage of the interactive
lane (safety, retrieval, inference) has no live member in its consumer group, a turn is refused at once
with **503** and ``Retry-After`` instead of being published into a pipeline that cannot answer it (the
client would wait ``turn_timeout_s`` for a 504). Batch submissions get the 503 only for the broker:
a batch waits in its topics for workers that come later.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from core import metrics
from core.background import PeriodicService
from core.config import Settings
from edge.errors import APIError
from topics.lag import LagReader
from topics.pools import pools
from topics.registry import (
    BATCH_GROUNDED,
    BATCH_REQUESTS,
    BATCH_SCREENED,
    CHAT_GROUNDED,
    CHAT_REQUESTS,
    CHAT_SCREENED,
    GROUPS,
    INFERENCE,
    RETRIEVAL,
    SAFETY,
    topic,
)

log = logging.getLogger(__name__)

INTERACTIVE = {SAFETY.group_id: CHAT_REQUESTS, RETRIEVAL.group_id: CHAT_SCREENED, INFERENCE.group_id: CHAT_GROUNDED}
BATCH = {SAFETY.group_id: BATCH_REQUESTS, RETRIEVAL.group_id: BATCH_SCREENED, INFERENCE.group_id: BATCH_GROUNDED}
LAG_MAX_AGE_S = 10.0
PIPELINE_GROUPS = (SAFETY.group_id, RETRIEVAL.group_id, INFERENCE.group_id)


@dataclass(frozen=True)
class Load:
    inflight: int  # turns open on this edge
    lag: int  # interactive-lane records not yet committed by the stage groups
    batch_backlog: int  # batch-lane records not yet committed by the stage groups
    drain_per_s: float  # turns finishing per second on this edge (recent)


@dataclass(frozen=True)
class Decision:
    admit: bool
    reason: str = ""  # why refused: inflight | lag | interactive_load | batch_backlog
    max_tokens: int | None = None  # the brownout cap, when one applies
    retry_after_s: int = 0

    def error(self, lane: str, load: Load, settings: Settings) -> APIError:
        """The 429 for a refusal (OpenAI error JSON + ``Retry-After``)."""
        what = {
            "inflight": f"{load.inflight} turns in flight on this edge (bound {settings.admit_max_inflight})",
            "lag": f"{load.lag} turns queued in the pipeline (bound {settings.admit_max_lag})",
            "interactive_load": "interactive traffic is near capacity; batch jobs are shed first",
            "batch_backlog": f"{load.batch_backlog} batch lines already queued (bound {settings.max_batch_backlog})",
        }[self.reason]
        return APIError(
            429,
            f"chatbus is at capacity: {what}. Retry after {self.retry_after_s} s.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after_s)},
        )


def _retry_after(excess: float, drain_per_s: float, ceiling: int) -> int:
    return int(min(ceiling, max(1, math.ceil(max(excess, 1.0) / max(drain_per_s, 0.5)))))


def decide(load: Load, settings: Settings, lane: str = "interactive", max_tokens: int = 0, lines: int = 0) -> Decision:
    """Admit or refuse one request given the current load (see the module docstring)."""
    inflight_ratio = load.inflight / max(settings.admit_max_inflight, 1)
    lag_ratio = load.lag / max(settings.admit_max_lag, 1)
    ratio = max(inflight_ratio, lag_ratio)
    reason = "inflight" if inflight_ratio >= lag_ratio else "lag"
    if lane == "batch":
        if ratio >= settings.batch_shed_at:
            return Decision(False, "interactive_load", retry_after_s=_retry_after(max(load.inflight, load.lag), load.drain_per_s, 600))
        if load.batch_backlog + lines > settings.max_batch_backlog:
            excess = load.batch_backlog + lines - settings.max_batch_backlog
            return Decision(False, "batch_backlog", retry_after_s=_retry_after(excess, load.drain_per_s, 600))
        return Decision(True)
    if ratio < 1.0:
        return Decision(True)
    excess = max(load.inflight - settings.admit_max_inflight, load.lag - settings.admit_max_lag) + 1
    if settings.brownout_max_tokens > 0 and ratio < settings.brownout_limit:
        return Decision(True, reason, max_tokens=min(max_tokens, settings.brownout_max_tokens) if max_tokens else settings.brownout_max_tokens)
    return Decision(False, reason, retry_after_s=_retry_after(excess, load.drain_per_s, 60))


class LoadMonitor(PeriodicService):
    """Reads consumer lag every ``admit_poll_s`` (also exported as ``chatbus:consumer_lag``) and tracks
    how fast this edge's turns finish."""

    task_name = "load-monitor"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.every_s = settings.admit_poll_s
        p = settings.topic_prefix
        extra = pools(settings)[1:]  # the extra models' inference groups (topics.pools)
        self.groups = {g.group_id: tuple(topic(t, p) for t in g.topics) for g in (*GROUPS, *(pool.group for pool in extra))}
        self.interactive = {(g, topic(t, p)) for g, t in INTERACTIVE.items()} | {(pool.group.group_id, topic(pool.grounded(), p)) for pool in extra}
        self.batch = {(g, topic(t, p)) for g, t in BATCH.items()} | {(pool.group.group_id, topic(pool.grounded("batch"), p)) for pool in extra}
        self.pool_groups = {pool.group.group_id for pool in extra}
        self.watched = [*PIPELINE_GROUPS, *self.pool_groups]  # whose live members are read
        self.listeners: list[Callable[[], None]] = []  # called after each good reading (edge.turns: reroute stranded turns)
        self.lag_by: dict[tuple[str, str], int] = {}
        self.read_at = 0.0  # monotonic time of the last good read
        self.admits: collections.deque[float] = collections.deque(maxlen=4096)  # when this edge admitted turns (monotonic)
        self.read_started = 0.0  # when the last good reading began: turns admitted after it are not in it
        self.finished: collections.deque[float] = collections.deque(maxlen=4096)
        self.members: dict[str, int] = {}  # live members per interactive stage group, at the last good reading
        self._reader = LagReader(settings)

    async def on_start(self) -> None:
        await self._reader.start()
        try:  # one reading before the first request, so the edge does not start "unreachable"
            await self.tick()
        except Exception as exc:
            log.warning("load monitor: first reading failed: %s: %s", type(exc).__name__, exc)

    async def on_stop(self) -> None:
        await self._reader.stop()

    async def tick(self) -> None:  # a failed read is logged; the reading then ages out (LAG_MAX_AGE_S)
        started = time.monotonic()
        async with asyncio.timeout(self.settings.bus_timeout_s):  # a broker that does not answer (SIGSTOP, a partition)
            # concurrently: on a cluster the groups' coordinators are on different brokers
            lag, members = await asyncio.gather(self._reader.read(self.groups), self._reader.members(self.watched))
        self.lag_by, self.read_at, self.members = lag, time.monotonic(), members
        self.read_started = started
        for (group, name), value in lag.items():
            metrics.CONSUMER_LAG.labels(group, name).set(value)
        for listener in self.listeners:
            listener()

    def snapshot(self, inflight: int) -> Load:
        fresh = time.monotonic() - self.read_at < LAG_MAX_AGE_S
        # an extra model's pool with no live worker takes no turns (edge.routing): what waits there is not queued for anyone
        counted = [v for k, v in self.lag_by.items() if k in self.interactive and (k[0] not in self.pool_groups or self.members.get(k[0], 0) > 0)]
        lag = sum(counted) + self.admitted_since_read if fresh else 0
        backlog = sum(v for k, v in self.lag_by.items() if k in self.batch) if fresh else 0
        now = time.monotonic()
        recent = sum(1 for t in self.finished if now - t < 10.0)
        return Load(inflight=inflight, lag=lag, batch_backlog=backlog, drain_per_s=recent / 10.0)

    def availability(self, lane: str = "interactive", inference: str = INFERENCE.group_id) -> tuple[str, str] | None:
        """Why turns of ``lane`` cannot be taken now — ``(reason, message)``, reason ``broker`` or
        ``no_worker`` — or None (see the module docstring). ``inference``: the consumer group of the model
        pool the turn goes to (:mod:`topics.pools`; the primary model's by default)."""
        stale_s = time.monotonic() - self.read_at
        if stale_s > self.settings.bus_stale_s:
            return "broker", f"the message bus has not answered for {stale_s:.0f} s"
        if lane == "interactive":
            groups = (SAFETY.group_id, RETRIEVAL.group_id, inference)
            missing = [g.removeprefix("chatbus-") for g in groups if self.members.get(g, 0) < 1]
            if missing:
                return "no_worker", f"no {' or '.join(missing)} worker is running"
        return None

    def unavailable(self, lane: str = "interactive", inference: str = INFERENCE.group_id) -> APIError | None:
        """The 503 to answer instead of admitting (counted), or None."""
        why = self.availability(lane, inference)
        if why is None:
            return None
        metrics.UNAVAILABLE.labels(lane, why[0]).inc()
        return unavailable_error(why[1], 5)

    @property
    def admitted_since_read(self) -> int:
        """Turns this edge admitted since the last good reading began (not in its lag yet)."""
        return sum(1 for _ in itertools.takewhile(lambda t: t > self.read_started, reversed(self.admits)))

    def admitted(self) -> None:
        self.admits.append(time.monotonic())

    def turn_finished(self) -> None:
        self.finished.append(time.monotonic())


def unavailable_error(why: str, retry_after_s: int) -> APIError:
    """A 503 with ``Retry-After`` (RFC 9110 §15.6.4) and OpenAI's error JSON."""
    return APIError(
        503,
        f"chatbus cannot take turns now: {why}. Retry after {retry_after_s} s.",
        type="service_unavailable",
        code="service_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def refuse(decision: Decision, lane: str, load: Load, settings: Settings, monitor: LoadMonitor | None = None) -> APIError:
    """Count a refusal and build its 429."""
    metrics.ADMISSION_REJECTED.labels(lane, decision.reason).inc()
    log.info("admission: %s request refused (%s): inflight=%d lag=%d batch_backlog=%d", lane, decision.reason, load.inflight, load.lag, load.batch_backlog)
    if monitor is not None:
        queued = {f"{g}:{t}": v for (g, t), v in monitor.lag_by.items() if v}
        log.info("admission: queued by group and topic %s, admitted since the last reading %d", queued, monitor.admitted_since_read)
    return decision.error(lane, load, settings)
