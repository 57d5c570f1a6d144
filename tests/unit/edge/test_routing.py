"""edge.routing: "auto", fallback and the circuit breaker, over a LoadMonitor's readings set by hand
(one function's unit test: the readings come from the real monitor on the stack, tests/stack/edge/test_model_pools.py)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from core.config import Settings
from core.routing import classify
from edge.admission import LoadMonitor
from edge.errors import APIError
from edge.routing import Router
from schemas.errors import NotFound
from schemas.events import ChatMessage
from topics.pools import pools

BIG, SMALL = "big-model", "small-model"


def settings(**extra: Any) -> Settings:
    values: dict[str, Any] = {
        "model": "tiny",
        "served_model_name": BIG,
        "extra_models": f"{SMALL}=tiny",
        "model_fallbacks": f"{SMALL}={BIG},{BIG}={SMALL},unknown-model={BIG}",
        "build_dir": Path("/nonexistent"),
    }
    return Settings(**{**values, **extra})


def router(s: Settings, live: tuple[str, ...] = (BIG, SMALL), lag: dict[str, int] | None = None) -> Router:
    by_name = {p.name: p for p in pools(s)}
    readings = SimpleNamespace(  # what LoadMonitor.tick reads from the broker
        members={by_name[name].group.group_id: 1 for name in live},
        lag_by={(p.group.group_id, p.grounded()): (lag or {}).get(p.name, 0) for p in by_name.values()},
    )
    return Router(s, cast(LoadMonitor, readings))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def test_classify_sends_code_reasoning_and_long_requests_to_the_primary_model() -> None:
    assert classify(user("Write a Python function that reverses a linked list")) == (True, "code")
    assert classify(user("Why does `x.sort()` return None?")) == (True, "code")
    assert classify(user("Prove that the square root of 2 is irrational.")) == (True, "reasoning")
    assert classify(user("What is 17 * 23?")) == (True, "reasoning")
    assert classify(user("tell me a story " * 100)) == (True, "long")
    assert classify(user("Hi! How are you today?")) == (False, "simple")
    assert classify(user("What is the capital of France?")) == (False, "simple")


def test_auto_picks_by_the_request_and_the_response_says_why() -> None:
    r = router(settings())
    code = r.route("auto", user("Fix this bug: def f(x): return x +"))
    assert code.pool.name == BIG and code.reason == "auto: code" and code.info is not None and code.info.requested == "auto"
    chat = r.route("auto", user("Good morning! Any tips for a relaxing weekend?"))
    assert chat.pool.name == SMALL and chat.reason == "auto: simple" and chat.fallback_from is None
    named = r.route(SMALL, user("hello"))
    assert named.pool.name == SMALL and named.info is None  # a named model answered by itself records nothing


def test_a_pool_without_a_live_worker_falls_back_and_one_without_a_fallback_gets_a_503() -> None:
    s = settings(model_fallbacks=f"{SMALL}={BIG}")
    r = router(s, live=(BIG,))
    route = r.route(SMALL, user("hello"))
    assert route.pool.name == BIG and route.fallback_from == SMALL and route.reason == "fallback: no live worker"
    assert "fallback_from=small-model" in route.header
    assert [p.name for p in r.live()] == [BIG]
    r = router(s, live=(SMALL,))
    with pytest.raises(APIError) as err:
        r.route(BIG, user("hello"))  # no fallback configured for the primary
    assert err.value.status == 503 and "Retry-After" in err.value.headers
    assert r.route("auto", user("def f(): pass")).pool.name == SMALL  # auto takes any healthy pool
    with pytest.raises(NotFound):
        r.route("no-such-model", user("hello"))


def test_an_overloaded_pool_falls_back_and_a_fallback_naming_no_model_is_skipped() -> None:
    s = settings(breaker_max_lag=5)
    r = router(s, lag={SMALL: 6})
    assert r.fallbacks == {SMALL: BIG, BIG: SMALL}  # BIG=unknown-model skipped (logged)
    route = r.route(SMALL, user("hello"))
    assert route.pool.name == BIG and route.reason == "fallback: overloaded"
    alone = router(settings(breaker_max_lag=5, model_fallbacks=""), lag={SMALL: 6})
    assert alone.route(SMALL, user("hello")).pool.name == SMALL  # nowhere else to go: it still takes the turn


def test_failures_in_a_row_open_the_breaker_until_its_cooldown_ends() -> None:
    r = router(settings(breaker_failures=2, breaker_cooldown_s=60))
    r.record(SMALL, ok=False)
    r.record(SMALL, ok=True)  # a success in between: the count starts again
    r.record(SMALL, ok=False)
    assert r.route(SMALL, user("hello")).pool.name == SMALL
    r.record(SMALL, ok=False)
    route = r.route(SMALL, user("hello"))
    assert route.pool.name == BIG and route.reason == "fallback: failing" and r.breakers[SMALL].opened == 1
    r.breakers[SMALL].open_until = time.monotonic() - 1  # the cooldown is over: half-open, the next turn tries it
    assert r.route(SMALL, user("hello")).pool.name == SMALL


def test_the_embedding_classifier_catches_technical_requests_the_heuristic_misses() -> None:
    """The committed classifier (core/models/route_classifier.npz) over the packaged embedder."""
    r = router(settings())
    question = user("How do distributed databases keep replicas in agreement?")  # no code or maths words
    assert classify(question) == (False, "simple")
    p = r.p_primary(question)
    assert p is not None and p >= 0.5
    route = r.route("auto", question, p)
    assert route.pool.name == BIG and route.reason.startswith("auto: classifier ")
    chat = user("Could you suggest a cheerful name for a sunflower farm?")
    p_chat = r.p_primary(chat)
    assert p_chat is not None and p_chat < 0.5
    assert r.route("auto", chat, p_chat).pool.name == SMALL
