"""Fair share of the engine across tenants: the turns waiting for a generation slot are served round-robin
over tenants, so a tenant that floods the worker waits behind its own turns, not everyone else's.

:class:`FairSlots` has ``capacity`` slots. A turn takes one with :meth:`FairSlots.acquire` (its tenant and lane)
and gives it back with :meth:`FairSlots.release`. While slots are free a turn takes one at once. Otherwise
it waits in its tenant's FIFO queue, and each freed slot goes to the waiting tenant that holds the fewest
slots now, ties to the one served longest ago (a tenant never served first). Among backlogged tenants that
is round robin with a quantum of one turn (deficit round robin, Shreedhar & Varghese, SIGCOMM 1995, turns
being the unit because their cost is not known before they run), except that a tenant that just became
backlogged goes first instead of joining the end of the round: a light tenant's turn waits for one slot
to free, not for a turn of every flooding tenant. Interactive turns are served before batch turns (the
lane's priority holds inside the engine too). A waiting turn that is cancelled leaves its queue.

A tenant that has no turn generating does not wait for a shared slot to free: ``reserve`` slots beyond
``capacity`` (``CHATBUS_FAIR_RESERVE_SLOTS``, 1 by default) go only to an interactive tenant holding none, so
its first turn starts at once however full the engine is (the place a preempting scheduler such as vLLM's
priority policy would evict a running sequence; here nothing is evicted). The engine thus runs at most
``capacity + reserve`` turns, one tenant at most ``capacity``, and a lone tenant uses every shared slot.

The worker fetches ``fair_queue_turns`` more turns than it runs (``CHATBUS_FAIR_QUEUE_TURNS``, 16 by default;
0 turns the fair queue off), so there are waiting turns to choose among; with 0 every fetched turn runs at
once, in Kafka's order. Fairness holds among the fetched turns: a tenant with more than
``max_inflight_turns + fair_queue_turns`` turns waiting on one worker's partitions still delays others'
records behind it in Kafka.
"""

from __future__ import annotations

import asyncio
import collections
import itertools

LANES = ("interactive", "batch")


class FairSlots:
    def __init__(self, capacity: int, reserve: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if reserve < 0:
            raise ValueError(f"reserve must be at least 0, got {reserve}")
        self.capacity = capacity
        self.reserve = reserve
        self.busy = 0
        self.holding: collections.Counter[str] = collections.Counter()  # tenant -> slots it holds
        self._served: dict[str, int] = {}  # tenant -> when it last got a slot (a sequence number)
        self._grants = itertools.count()
        # per lane: tenant -> its waiting turns (FIFO)
        self._queues: dict[str, dict[str, collections.deque[asyncio.Future[None]]]] = {lane: {} for lane in LANES}

    @property
    def waiting(self) -> int:
        return sum(len(q) for lane in self._queues.values() for q in lane.values())

    async def acquire(self, tenant: str, lane: str = "interactive") -> None:
        """Wait for a slot (see the module docstring). Cancelled while waiting: it leaves the queue."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queues = self._queues[lane]
        queues.setdefault(tenant, collections.deque()).append(future)
        self._dispatch()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as it was cancelled: pass the slot on
                self.release(tenant)
            else:
                self._forget(queues, tenant, future)
            raise

    def release(self, tenant: str) -> None:
        """``tenant`` gives a slot back; it goes to the next waiting turn (:meth:`_dispatch`), else it is free."""
        self.holding[tenant] -= 1
        if self.holding[tenant] <= 0:
            del self.holding[tenant]
        self.busy -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant slots while one may go: interactive lane first, in each lane to the waiting tenant holding
        fewest slots, then served longest ago. A shared slot goes to anyone; a reserved one (beyond
        ``capacity``) only to an interactive tenant holding none."""
        for lane in LANES:
            queues = self._queues[lane]
            while queues:
                nxt = min(queues, key=lambda t: (self.holding[t], self._served.get(t, -1)))
                reserved = lane == "interactive" and nxt not in self.holding and self.busy < self.capacity + self.reserve
                if self.busy >= self.capacity and not reserved:
                    break  # every other waiting tenant holds at least as many slots: none may take a reserved one
                waiting = queues[nxt]
                future = waiting.popleft()
                if not waiting:
                    del queues[nxt]
                if not future.done():
                    self.busy += 1
                    self._grant(nxt)
                    future.set_result(None)

    def _grant(self, tenant: str) -> None:
        self.holding[tenant] += 1
        self._served[tenant] = next(self._grants)
        if len(self._served) > 10_000:  # tenants long gone: forget the oldest half
            for t in sorted(self._served, key=self._served.__getitem__)[:5_000]:
                del self._served[t]

    @staticmethod
    def _forget(queues: dict[str, collections.deque[asyncio.Future[None]]], tenant: str, future: asyncio.Future[None]) -> None:
        waiting = queues.get(tenant)
        if waiting is None:
            return
        try:
            waiting.remove(future)
        except ValueError:
            return
        if not waiting:
            del queues[tenant]
