"""Operator surfaces on the real stack: readiness, auth, topic and lag views, idempotent start/stop."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from chatbus.stack import Stack
from core.config import Settings
from edge.app import STAGE_GROUPS, create_app
from topics.ops import consumer_lag, describe_topics

pytestmark = pytest.mark.stack


async def test_readyz_names_every_stage_and_healthz_is_up(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        ready = await http.get(f"{edge_url}/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["ready"] is True and body["broker"] is True and body["relay"] is True
        assert all(body[g] is True for g in STAGE_GROUPS)
        assert (await http.get(f"{edge_url}/healthz")).json() == {"status": "ok"}


def test_api_keys_guard_the_v1_routes(settings: Settings, stack: Stack) -> None:
    guarded = settings.model_copy(update={"api_keys": SecretStr("key-one, key-two"), "reply_partition": 5})
    with TestClient(create_app(guarded)) as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer key-two"}).status_code == 200
        bad = http.post("/v1/chat/completions", json={"model": "x"})
        assert bad.status_code == 401  # auth is checked before anything else
        assert http.get("/healthz").status_code == 200  # probes need no key


async def test_topic_and_lag_views(settings: Settings, stack: Stack) -> None:
    rows = await describe_topics(settings)
    assert any(r.startswith("chat.requests") for r in rows) and any(r.startswith("chat.dlq") for r in rows)
    lag = await consumer_lag(settings)
    groups = {r.split()[0] for r in lag[1:]}
    assert {"chatbus-safety", "chatbus-inference", "chatbus-recorder"} <= groups
    assert all(int(r.split()[-1]) >= 0 for r in lag[1:])


def test_up_is_idempotent_and_down_touches_only_its_own_processes(stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = stack.status()
    assert all(before.values()), before
    stack.up(services=("safety", "recorder"), wait=False)  # already running: nothing new starts
    assert stack.status() == before
    stranger = Stack(settings.model_copy(update={"state_dir": tmp_path_factory.mktemp("other-stack")}))
    assert stranger.down() == []
    # a pid file that points at one of *our* processes does not make a stranger kill it
    stranger.paths.pids.mkdir(parents=True, exist_ok=True)
    stranger.paths.pidfile("edge").write_text(str(before["edge"]))
    assert stranger.down() == []
    assert stack.status() == before
