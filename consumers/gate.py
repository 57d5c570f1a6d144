"""Flow control for the batch lane: a stage works on batch records only while the next stage keeps up.

Without it, safety and retrieval race through a whole batch long before generation reaches it: their
CPU competes with the engine (on a small host that is what slows chat down most), and a cancelled batch
has thousands of pre-processed lines to wind down. A :class:`DownstreamGate` polls the next stage's
backlog on its batch topic — the end offsets minus that consumer group's committed offsets, summed over
partitions — and closes above ``high`` records, opening again below ``low`` (hysteresis). Interactive
records never wait for it. If the backlog cannot be read, the gate stays open (batches are never stuck).
"""

from __future__ import annotations

import logging

from core.background import PeriodicService
from core.config import Settings
from topics.lag import LagReader
from topics.registry import topic

log = logging.getLogger(__name__)


class DownstreamGate(PeriodicService):
    def __init__(self, settings: Settings, name: str, group_id: str, *, high: int = 16, low: int = 4, every_s: float = 0.5) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic(name, settings.topic_prefix)
        self.task_name = f"gate-{self.topic}"
        self.group_id = group_id
        self.high, self.low, self.every_s = high, low, every_s
        self.open = True
        self.backlog = 0
        self._lag = LagReader(settings)

    async def on_start(self) -> None:
        await self._lag.start()

    async def on_stop(self) -> None:
        await self._lag.stop()

    async def measure(self) -> int:
        """The downstream group's backlog on the topic (records not yet committed by it)."""
        lag = await self._lag.read({self.group_id: (self.topic,)})
        return sum(lag.values())

    async def tick(self) -> None:
        self.backlog = await self.measure()
        was = self.open
        self.open = self.backlog < (self.high if self.open else self.low)
        if was != self.open:
            log.info("batch lane %s: %s backlog %d", "open" if self.open else "held", self.group_id, self.backlog)

    def failed(self, exc: Exception) -> None:
        self.open = True  # fail open: flow control must never strand a batch
