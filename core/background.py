"""The start/stop life of a process's background loops (a topic tail, a lag poller, the reply relay).

:class:`BackgroundService`: ``start()`` runs :meth:`~BackgroundService.on_start` (connect clients) and then
:meth:`~BackgroundService.loop` as one asyncio task; ``stop()`` cancels that task, waits for it and runs
:meth:`~BackgroundService.on_stop`. ``stop()`` is safe to call when ``start()`` failed half-way or never ran.
:class:`PeriodicService` is a loop that calls :meth:`~PeriodicService.tick` every ``every_s`` seconds; a
tick that raises is logged and handed to :meth:`~PeriodicService.failed`, never fatal.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class BackgroundService:
    """One background task with an on_start/on_stop around it. Subclasses implement :meth:`loop`."""

    task_name = "background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        """Connect what the loop needs (called by :meth:`start` before the task starts)."""

    async def on_stop(self) -> None:
        """Release what :meth:`on_start` connected (called by :meth:`stop` after the task ended)."""

    async def loop(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.on_start()
        self._task = asyncio.create_task(self.loop(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.on_stop()

    @property
    def alive(self) -> bool:
        """True while the loop task runs (False before ``start``, after ``stop`` or if it died)."""
        return self._task is not None and not self._task.done()


class PeriodicService(BackgroundService):
    """A loop of :meth:`tick` every ``every_s`` seconds (the sleep comes after each tick)."""

    every_s = 1.0

    async def tick(self) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """A tick raised ``exc`` (after logging it); subclasses choose a safe state here."""

    async def loop(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: %s: %s", self.task_name, type(exc).__name__, exc)
                self.failed(exc)
            await asyncio.sleep(self.every_s)
