"""LagReader's renewal of its clients after calls that hang (unit: fake clients stand in for aiokafka's)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.config import Settings
from topics import lag


class FakeAdmin:
    def __init__(self, hangs: bool) -> None:
        self.hangs, self.closed, self.started = hangs, False, False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def describe(self) -> dict[str, Any]:
        if self.hangs:
            await asyncio.Event().wait()
        return {"g": {"members": 1}}


class FakeConsumer:
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_calls_that_hang_three_times_in_a_row_get_new_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    admins: list[FakeAdmin] = []

    def make_admin(settings: Settings) -> FakeAdmin:
        admins.append(FakeAdmin(hangs=not admins))  # the first client hangs, its replacement answers
        return admins[-1]

    monkeypatch.setattr(lag, "make_admin", make_admin)
    monkeypatch.setattr(lag, "make_consumer", lambda settings, group_id: FakeConsumer())
    monkeypatch.setattr(lag, "describe_groups", lambda admin, ids: admin.describe())
    reader = lag.LagReader(Settings())
    await reader.start()
    for _ in range(lag.RENEW_AFTER):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await reader.members(["g"])
    assert reader.failures == lag.RENEW_AFTER and len(admins) == 1
    assert await reader.members(["g"]) == {"g": 1}
    assert len(admins) == 2 and admins[0].closed and admins[1].started
    assert reader.failures == 0 and reader.renewals == 1
    await reader.stop()


async def test_a_call_that_answers_resets_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lag, "make_admin", lambda settings: FakeAdmin(hangs=False))
    monkeypatch.setattr(lag, "make_consumer", lambda settings, group_id: FakeConsumer())
    monkeypatch.setattr(lag, "describe_groups", lambda admin, ids: admin.describe())
    reader = lag.LagReader(Settings())
    reader.failures = lag.RENEW_AFTER - 1
    assert await reader.members(["g"]) == {"g": 1}
    assert reader.failures == 0 and reader.renewals == 0
