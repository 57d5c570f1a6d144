"""Which model answers a turn: ``model: "auto"`` routing, and fallback with a circuit breaker per model pool.

Every served model has a pool of inference workers of its own (:mod:`topics.pools`). The edge picks the
pool before it publishes a turn, so the retrieval worker sends the grounded turn to that pool's topic:

* **A named model** goes to its pool.
* **``auto``** (:func:`classify`) goes to the primary model (``CHATBUS_MODEL``) when the request shows code,
  maths or multi-step reasoning, or is long, and to ``CHATBUS_AUTO_SMALL_MODEL`` (default: the last extra
  model) otherwise — the cheap model for simple queries, as in LiteLLM's and RouteLLM's routers.
* **Fallback.** A pool is down when its consumer group has no live member, overloaded when more than
  ``CHATBUS_BREAKER_MAX_LAG`` interactive turns wait in its topic, and failing when its last
  ``CHATBUS_BREAKER_FAILURES`` turns ended in errors (then its breaker stays open for
  ``CHATBUS_BREAKER_COOLDOWN_S``, after which the next turn tries it again: half-open, as LiteLLM's
  cooldowns; only engine errors count, not an invalid tool call). A turn for such a pool goes to its
  ``CHATBUS_MODEL_FALLBACKS`` model when that one is healthy. Otherwise a pool with no live worker answers
  a 503 with ``Retry-After``, and an overloaded or failing one still takes the turn (admission's 429s bound
  the overload). ``auto`` takes any healthy pool.

The choice is recorded on the turn (:class:`schemas.events.RouteInfo`), so the recorder stores it, and the
response says it: ``model`` is the model that answered, ``route`` (and the ``X-Chatbus-Route`` header) says
what was asked and why. Health comes from the edge's :class:`edge.admission.LoadMonitor` readings (every
``admit_poll_s``), so a pool that dies is noticed within one reading; turns already waiting in a dead
pool's topic stay there until a worker of that pool is back (the keeper restarts it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from core import metrics
from core.config import Settings
from core.embeddings import TextEmbedder, get_embedder
from core.routing import AUTO, classify, last_user_text, load_classifier
from edge.admission import LoadMonitor, unavailable_error
from edge.errors import APIError
from schemas.errors import NotFound
from schemas.events import ChatMessage, RouteInfo
from topics.pools import ModelPool, parse_pairs, pool_named, pools
from topics.registry import topic

log = logging.getLogger(__name__)

NO_WORKER = "no live worker"


@dataclass
class Breaker:
    """Failures in a row of one pool and, once they reach the bound, until when its breaker is open."""

    failures: int = 0
    open_until: float = 0.0
    opened: int = field(default=0)  # times it opened (for logs and tests)


@dataclass(frozen=True)
class Route:
    pool: ModelPool
    requested: str
    reason: str
    fallback_from: str | None = None

    @property
    def info(self) -> RouteInfo | None:
        """What the turn records, or None for a named model answered by itself."""
        if self.requested == self.pool.name and self.fallback_from is None:
            return None
        return RouteInfo(requested=self.requested, reason=self.reason, fallback_from=self.fallback_from)

    @property
    def header(self) -> str:
        value = f"model={self.pool.name}; requested={self.requested}; reason={self.reason}"
        return value + (f"; fallback_from={self.fallback_from}" if self.fallback_from else "")


class Router:
    """Picks the pool of each turn (see the module docstring). Raises ValueError at construction for a
    ``CHATBUS_AUTO_SMALL_MODEL`` naming no served model (fallback pairs naming one are skipped, logged)."""

    def __init__(self, settings: Settings, monitor: LoadMonitor) -> None:
        self.settings = settings
        self.monitor = monitor
        self.pools = pools(settings)
        self.fallbacks: dict[str, str] = {}
        for a, b in parse_pairs(settings.model_fallbacks).items():  # pairs naming a model not served here are skipped
            if pool_named(settings, a) is None or pool_named(settings, b) is None:
                log.warning("CHATBUS_MODEL_FALLBACKS: %s=%s skipped: served here are %s", a, b, ", ".join(p.name for p in self.pools))
            else:
                self.fallbacks[a] = b
        small = settings.auto_small_model or self.pools[-1].name
        small_pool = pool_named(settings, small)
        if small_pool is None:
            raise ValueError(f"CHATBUS_AUTO_SMALL_MODEL: {small!r} is not a served model")
        self.small = small_pool
        self.breakers: dict[str, Breaker] = {p.name: Breaker() for p in self.pools}
        self._embedder: TextEmbedder | None = None

    # --- health ------------------------------------------------------------------------------------------
    def why_not(self, pool: ModelPool) -> str | None:
        """Why ``pool`` should take no new turns now (``no live worker``, ``overloaded``, ``failing``), or None."""
        group = pool.group.group_id
        if self.monitor.members.get(group, 0) < 1:
            return NO_WORKER
        waiting = self.monitor.lag_by.get((group, topic(pool.grounded(), self.settings.topic_prefix)), 0)
        if waiting > self.settings.breaker_max_lag:
            return "overloaded"
        if self.breakers[pool.name].open_until > time.monotonic():
            return "failing"
        return None

    def live(self) -> list[ModelPool]:
        """Pools with a live worker at the last reading."""
        return [p for p in self.pools if self.monitor.members.get(p.group.group_id, 0) >= 1]

    def record(self, model: str, ok: bool) -> None:
        """A turn of ``model`` ended: a success closes its breaker, ``breaker_failures`` engine errors in a row
        open it (the caller leaves out errors that are the request's or the model's answer's, such as an
        invalid tool call)."""
        breaker = self.breakers.get(model)
        if breaker is None:
            return
        if ok:
            breaker.failures = 0
            return
        breaker.failures += 1
        if breaker.failures >= self.settings.breaker_failures:
            breaker.failures = 0
            breaker.open_until = time.monotonic() + self.settings.breaker_cooldown_s
            breaker.opened += 1
            cooldown = self.settings.breaker_cooldown_s
            log.warning("routing: %s failed %d turns in a row: breaker open for %.0f s", model, self.settings.breaker_failures, cooldown)

    def p_primary(self, messages: list[ChatMessage]) -> float | None:
        """The embedding classifier's P(primary) for the last user message (blocking: ~10 ms on CPU), or
        None without a classifier. Always the packaged all-MiniLM-L6-v2, the embedder it was trained on."""
        classifier = load_classifier()
        text = last_user_text(messages)
        if classifier is None or not text.strip():
            return None
        if self._embedder is None:
            self._embedder = get_embedder()
        return classifier.probability(self._embedder.encode([text])[0])

    # --- routing -----------------------------------------------------------------------------------------
    def route(self, requested: str, messages: list[ChatMessage], p_primary: float | None = None) -> Route:
        """The pool for a turn asking for ``requested``; for ``auto``, ``p_primary`` is the embedding
        classifier's P(primary) of the request (None: the heuristic alone). Raises a 404 for a model not
        served, a 503 when it (and its fallback) cannot take turns."""
        if requested == AUTO:
            big, signal = classify(messages)
            classifier = load_classifier()
            if not big and p_primary is not None and classifier is not None:
                big = p_primary >= classifier.threshold
                signal = f"classifier {p_primary:.2f}"
            want = self.pools[0] if big else self.small
            why = self.why_not(want)
            if why is None:
                return self._counted(Route(want, AUTO, f"auto: {signal}"))
            other = next((p for p in self.pools if p is not want and self.why_not(p) is None), None)
            if other is None and why != NO_WORKER:
                return self._counted(Route(want, AUTO, f"auto: {signal}"))
            if other is None:
                raise self._unavailable(want, why)
            return self._counted(Route(other, AUTO, f"auto: {signal}; {want.name} {why}", fallback_from=want.name))
        pool = pool_named(self.settings, requested)
        if pool is None:
            raise NotFound(f"The model `{requested}` does not exist.", type="NotFoundError", param="model", code="model_not_found")
        why = self.why_not(pool)
        if why is None:
            return self._counted(Route(pool, requested, "requested"))
        fallback = pool_named(self.settings, self.fallbacks.get(pool.name, ""))
        if fallback is not None and self.why_not(fallback) is None:
            return self._counted(Route(fallback, requested, f"fallback: {why}", fallback_from=pool.name))
        if why != NO_WORKER:  # overloaded or failing, with nowhere else to go: it still takes the turn
            return self._counted(Route(pool, requested, "requested"))  # (admission's 429s bound the overload)
        raise self._unavailable(pool, why)

    def _counted(self, route: Route) -> Route:
        metrics.ROUTED.labels(route.pool.name, route.reason.split(":")[0], "yes" if route.fallback_from else "no").inc()
        return route

    def _unavailable(self, pool: ModelPool, why: str) -> APIError:
        metrics.UNAVAILABLE.labels("interactive", "no_worker").inc()
        return unavailable_error(f"no inference worker of model {pool.name} is running, and no fallback can take its turns", 5)
