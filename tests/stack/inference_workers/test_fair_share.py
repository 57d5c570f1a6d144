"""Fair share across tenants on the real stack: an inference worker with one generation slot, one reserve
slot and a fair queue (``fair_queue_turns``), on the ``openai`` engine against a scripted upstream whose
answers last ~3 s. One key floods it with six turns; a turn of another key sent after them starts at once
in the reserve slot, while the first heavy turn still runs — second, not seventh as in arrival order. All
seven share one partition, so without the fair queue Kafka's order is the arrival order (with turns spread
over partitions, the consumer's round-robin over partitions already mixes tenants). The round-robin among
waiting tenants is covered by the unit tests (tests/unit/inference_workers/test_fair_slots.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner

from chatbus.stack import Stack
from tests.conftest import edge_process, eventually
from tests.upstream import Upstream, spawn_scripted_inference
from topics.registry import CHAT_GROUNDED, spec

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
HEAVY, LIGHT = "sk-heavy-tenant", "sk-light-tenant"


def script(prompt: str) -> str:
    return " ".join(f"w{i}" for i in range(150))  # 150 words at 20 ms: ~3 s per answer


@pytest.fixture(scope="module")
def upstream(stack: Stack) -> Iterator[Upstream]:
    with Upstream(script, pace_s=0.02) as up:
        stack.stop("inference")
        spawn_scripted_inference(stack, up, MODEL, max_inflight_turns=1, fair_queue_turns=16, fair_reserve_slots=1, output_rail=False)
        stack.wait_ready()
        try:
            yield up
        finally:
            stack.stop("inference")
            stack.start_worker("inference")
            stack.wait_ready()


def one_partition(n: int) -> list[str]:
    """``n`` conversation ids whose turns share one partition of ``chat.grounded`` (the producers' murmur2
    partitioner, as Kafka's Java client), so Kafka hands the worker their turns in arrival order."""
    partitions = list(range(spec(CHAT_GROUNDED).partitions))
    choose = DefaultPartitioner()
    ids = (f"conv-fair-{i}" for i in itertools.count())
    return list(itertools.islice((c for c in ids if choose(c.encode(), partitions, partitions) == 0), n))


def body(marker: str, conversation_id: str) -> dict[str, object]:
    assert len(marker) == 12  # the upstream knows a prompt by its last 12 characters
    content = f"Please answer ticket {marker}"
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 200, "conversation_id": conversation_id}


async def test_a_flooding_tenant_does_not_delay_another_tenants_turn(stack: Stack, upstream: Upstream) -> None:
    with edge_process(stack, 3, api_keys=f"{HEAVY},{LIGHT}", admit_max_inflight=16, admit_max_lag=32) as (url, _):
        async with httpx.AsyncClient(timeout=120) as http:
            conversations = one_partition(7)

            async def ask(key: str, marker: str, conversation_id: str) -> float:
                started = time.monotonic()
                r = await http.post(f"{url}/v1/chat/completions", json=body(marker, conversation_id), headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text
                return time.monotonic() - started

            heavy = [asyncio.create_task(ask(HEAVY, f"heavy-{i:06d}", conversations[i])) for i in range(6)]
            await eventually(lambda: asyncio.sleep(0, len(upstream.started) >= 1), 30, "the first heavy turn generating")
            await asyncio.sleep(0.5)  # the other five fetched and waiting in the worker
            light = await ask(LIGHT, "light-000001", conversations[6])
            await asyncio.gather(*heavy)
    order = [m for m in upstream.started if m.startswith(("heavy-", "light-"))]
    assert len(order) == 7
    assert order.index("light-000001") == 1, order  # arrival order would make it 7th
    log = [e for e in upstream.log if e[1].startswith(("heavy-", "light-"))]
    assert log.index(("start", "light-000001")) < log.index(("end", "heavy-000000")), log  # the reserve slot: no wait for a shared one
    assert light < 9, f"the light tenant's turn took {light:.1f} s"  # its own answer (~3 s), no heavy answer's wait
