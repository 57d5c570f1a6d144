"""The keeper on the real stack: a worker killed with SIGKILL is restarted (its reason logged), rejoins its
consumer group, and the turns published meanwhile are recorded — nothing lost."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import httpx
import pytest

from chatbus.keeper import Keeper
from chatbus.stack import Stack
from tests.conftest import eventually

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


async def test_keeper_restarts_a_killed_worker(stack: Stack, edge_url: str, mongo: Any) -> None:
    keeper = Keeper(stack, services=["recorder"], base_s=0.5)
    old = stack.running("recorder")
    assert old is not None
    os.kill(old, signal.SIGKILL)
    async with httpx.AsyncClient(base_url=edge_url, timeout=90) as http:  # a turn while the recorder is down
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Name a prime number."}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    deadline = time.monotonic() + 20
    while "recorder" not in keeper.check():
        assert time.monotonic() < deadline, "the keeper did not restart the recorder"
        await asyncio.sleep(0.2)
    assert keeper.restarted == [("recorder", "killed by SIGKILL")]
    new = stack.running("recorder")
    assert new is not None and new != old
    await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}}), 60, "the turn recorded by the restarted recorder")
    await asyncio.to_thread(stack.wait_ready)
