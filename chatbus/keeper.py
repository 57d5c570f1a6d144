"""The local stack's keeper: restarts a crashed service with back-off and logs why it went.

A small loop rather than supervisord or circus: those would take over spawning, log files and pid files,
which :mod:`chatbus.supervisor` already does with its ownership checks (a pid is ours only with our start
time and our state dir); what the stack lacked is only the restart policy, ~60 lines here.

* A service is *kept* while its pid file exists: ``Stack.stop``/``down`` remove it, so a service stopped
  on purpose is never restarted; a process that died with its pid file in place crashed.
* Why it went: its exit status when the keeper is its parent (``chatbus stack run``, or any service the
  keeper restarted), else "not our child"; and the last line of its log.
* Back-off (:class:`Backoff`): the n-th restart in a row waits ``min(max_s, base_s * 2**(n-1))``; a
  service that stayed up ``stable_s`` starts again from the base.

``chatbus stack up`` runs the keeper as a service of its own (``keeper``, stopped first by ``down``);
``chatbus stack run`` runs it in the foreground. ``CHATBUS_SUPERVISE=false`` turns it off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chatbus.proc import read_pidfile
from chatbus.stack import Stack

log = logging.getLogger("chatbus.keeper")


@dataclass
class Backoff:
    """Restart delays of one service (seconds)."""

    base_s: float = 1.0
    max_s: float = 60.0
    stable_s: float = 30.0
    restarts: int = 0  # in a row, without a stable run between them
    started_at: float = field(default_factory=time.monotonic)

    def delay(self, now: float) -> float:
        """The wait before the next restart of a service that just went down at ``now``."""
        if now - self.started_at >= self.stable_s:
            self.restarts = 0
        self.restarts += 1
        return float(min(self.max_s, self.base_s * 2 ** (self.restarts - 1)))


def exit_reason(pid: int) -> str:
    """How ``pid`` ended, if it is our child: ``exit code N`` / ``killed by SIGKILL``; else 'not our child'."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exit status unknown (not our child)"
    if reaped == 0:
        return "still running"
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        import signal

        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Keeper:
    def __init__(self, stack: Stack, services: Sequence[str] | None = None, clock: Callable[[], float] = time.monotonic, **backoff: float) -> None:
        self.stack = stack
        self.services = list(stack.services if services is None else services)
        self.clock = clock
        self.backoff = {name: Backoff(**backoff) for name in self.services}  # type: ignore[arg-type]
        self.due: dict[str, float] = {}  # crashed service -> when to restart it
        self.restarted: list[tuple[str, str]] = []  # (service, why), for status and tests

    def check(self) -> list[str]:
        """One pass: notice crashed services, restart those whose back-off has passed. Returns those restarted."""
        now = self.clock()
        out: list[str] = []
        for name in self.services:
            entry = read_pidfile(self.stack.paths.pidfile(name))
            if entry is None:  # never started, or stopped on purpose
                self.due.pop(name, None)
                continue
            if name not in self.due:
                pid = entry[0]
                reason = exit_reason(pid)
                if reason == "still running" or self.stack.running(name):
                    continue
                wait = self.backoff[name].delay(now)
                self.due[name] = now + wait
                log.warning("%s (pid %d) went down: %s; last log line: %s; restarting in %.0f s", name, pid, reason, self._last_line(name), wait)
                self.restarted.append((name, reason))
            if now >= self.due[name]:
                self.stack.paths.pidfile(name).unlink(missing_ok=True)
                try:
                    self.stack.start(name)
                except Exception as exc:  # e.g. a port still held: try again after the next back-off
                    log.error("%s: restart failed: %s", name, exc)
                    self.stack.paths.pidfile(name).write_text(f"{entry[0]} {entry[1] or ''}".strip() + "\n")
                    self.due[name] = now + self.backoff[name].delay(now)
                    continue
                self.backoff[name].started_at = self.clock()
                del self.due[name]
                out.append(name)
                log.info("%s restarted", name)
        return out

    def _last_line(self, name: str) -> str:
        path = self.stack.paths.logs / f"{name}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        except OSError:
            return "(no log)"
        return lines[-1][:300] if lines else "(empty log)"

    def run(self, every_s: float = 1.0) -> None:
        """Check every ``every_s`` seconds until interrupted (KeyboardInterrupt / SIGTERM handled by the caller)."""
        log.info("keeper: watching %s", ", ".join(self.services))
        while True:
            self.check()
            time.sleep(every_s)
