"""FairSlots (inference_workers.fair): round-robin over tenants for the engine's slots."""

from __future__ import annotations

import asyncio

import pytest

from inference_workers.fair import FairSlots


async def started_order(slots: FairSlots, turns: list[tuple[str, str]]) -> list[str]:
    """Queue ``(name, tenant)`` turns in order behind one held slot; release it; the order they got slots."""
    order: list[str] = []

    async def turn(name: str, tenant: str) -> None:
        await slots.acquire(tenant)
        order.append(name)
        await asyncio.sleep(0)
        slots.release(tenant)

    await slots.acquire("holder")
    tasks = [asyncio.create_task(turn(n, t)) for n, t in turns]
    await asyncio.sleep(0.01)
    assert slots.waiting == len(turns)
    slots.release("holder")
    await asyncio.gather(*tasks)
    return order


async def test_a_flooding_tenant_waits_behind_its_own_turns() -> None:
    flood = [(f"a{i}", "a") for i in range(6)]
    order = await started_order(FairSlots(1), [*flood, ("b0", "b"), ("b1", "b")])
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]  # FIFO would have run b0 seventh


async def test_interactive_turns_go_before_batch_turns() -> None:
    slots = FairSlots(1)
    order: list[str] = []

    async def turn(name: str, lane: str) -> None:
        await slots.acquire("t", lane)
        order.append(name)
        slots.release("t")

    await slots.acquire("holder")
    tasks = [asyncio.create_task(turn("batch", "batch")), asyncio.create_task(turn("chat", "interactive"))]
    await asyncio.sleep(0.01)
    slots.release("holder")
    await asyncio.gather(*tasks)
    assert order == ["chat", "batch"]


async def test_a_cancelled_waiter_leaves_its_queue_and_slots_are_not_lost() -> None:
    slots = FairSlots(2)
    await slots.acquire("a")
    await slots.acquire("a")
    waiter = asyncio.create_task(slots.acquire("b"))
    await asyncio.sleep(0.01)
    assert slots.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == 0
    slots.release("a")
    slots.release("a")
    assert slots.busy == 0 and not slots.holding
    await asyncio.wait_for(slots.acquire("c"), 1)  # free again at once
    assert slots.busy == 1


async def test_a_waiter_granted_as_it_is_cancelled_passes_the_slot_on() -> None:
    slots = FairSlots(1)
    await slots.acquire("a")
    first = asyncio.create_task(slots.acquire("b"))
    second = asyncio.create_task(slots.acquire("c"))
    await asyncio.sleep(0.01)
    slots.release("a")  # granted to b ...
    first.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # c got the slot b could not use
    assert slots.busy == 1 and slots.waiting == 0 and slots.holding == {"c": 1}


async def test_a_tenant_that_just_started_waiting_goes_before_one_that_floods() -> None:
    """With two slots held by a flooding tenant, a newcomer gets the next slot although the flood queued first."""
    slots = FairSlots(2)
    await slots.acquire("a")
    await slots.acquire("a")
    order: list[str] = []

    async def turn(name: str, tenant: str) -> None:
        await slots.acquire(tenant)
        order.append(name)

    flood = [asyncio.create_task(turn(f"a{i}", "a")) for i in range(3)]
    await asyncio.sleep(0.01)
    light = asyncio.create_task(turn("b0", "b"))
    await asyncio.sleep(0.01)
    slots.release("a")
    await asyncio.sleep(0.01)
    assert order == ["b0"]  # b holds no slot, a holds one: b first
    slots.release("a")
    await asyncio.sleep(0.01)
    assert order == ["b0", "a0"]
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, light, return_exceptions=True)


async def test_a_reserve_slot_goes_only_to_a_tenant_with_none() -> None:
    slots = FairSlots(2, reserve=1)
    await slots.acquire("heavy")
    await slots.acquire("heavy")
    heavy = asyncio.create_task(slots.acquire("heavy"))  # the flooding tenant never takes the reserve
    await asyncio.sleep(0.01)
    assert not heavy.done() and slots.busy == 2
    await asyncio.wait_for(slots.acquire("light"), 1)  # a tenant with nothing running starts at once
    assert slots.busy == 3 and slots.holding["light"] == 1
    second = asyncio.create_task(slots.acquire("light"))  # its second turn waits like anyone else's
    batch = asyncio.create_task(slots.acquire("other", "batch"))  # and batch turns never take the reserve
    await asyncio.sleep(0.01)
    assert not second.done() and not batch.done()
    slots.release("light")  # light holds none again: its second turn takes the reserve at once
    await asyncio.wait_for(second, 1)
    assert slots.busy == 3 and not heavy.done()
    slots.release("heavy")  # the engine is at its shared capacity again (heavy 1 + light 1): heavy waits
    await asyncio.sleep(0.01)
    assert slots.busy == 2 and not heavy.done() and not batch.done()
    slots.release("light")  # now a shared slot is free: the interactive heavy turn before the batch one
    await asyncio.wait_for(heavy, 1)
    assert not batch.done() and slots.holding["heavy"] == 2
    batch.cancel()
    await asyncio.gather(batch, return_exceptions=True)
    assert slots.waiting == 0


async def test_a_lone_tenant_uses_every_shared_slot() -> None:
    slots = FairSlots(3, reserve=1)
    for _ in range(3):
        await asyncio.wait_for(slots.acquire("only"), 1)
    assert slots.busy == 3
    waiter = asyncio.create_task(slots.acquire("only"))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # the reserve is for someone else
    slots.release("only")
    await asyncio.wait_for(waiter, 1)
    assert slots.busy == 3
