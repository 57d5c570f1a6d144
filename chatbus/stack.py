"""The local stack without Docker: Kafka (KRaft, one node), FerretDB (SQLite), the workers and the edge.

* Kafka's jars come from Maven Central (``tools/kafka/pom.xml``, copied to ``<build>/kafka-libs``); the
  broker is started with ``java … kafka.Kafka`` after ``kafka.tools.StorageTool format``.
* FerretDB v1 is built from the Go module proxy (``tools/ferretdb``) into ``<build>/bin``.
* Every process runs in its own session, logs to ``<state>/logs/NAME.log`` and leaves a pid file in
  ``<state>/pids`` holding ``PID STARTTIME`` (the start time from ``/proc/PID/stat``, so a reused pid is
  never mistaken for ours; files holding only a pid are still read). ``down`` signals only processes
  whose pid file is ours, whose start time matches *and* whose environment carries this stack's
  ``CHATBUS_STATE_DIR``, so it never touches anything it did not start. When a service's session
  leader has died, the surviving members of its process group that are ours are stopped as well.
* Kafka and FerretDB get no secret settings in their environment; the workers and the edge get them all.

``up`` and ``down`` are idempotent: a service already running (its pid alive) is left alone. A failed
``up`` stops the services that it started itself before raising.

Modules: :mod:`chatbus.proc` (``/proc``, pid files, ports), :mod:`chatbus.supervisor` (environments, spawn,
stop), :mod:`chatbus.infra` (Kafka and FerretDB set-up); this module puts the services in order. Their names
are importable from here as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import httpx

from chatbus.infra import start_ferretdb, start_kafka
from chatbus.proc import StackError, free_port, host_port, is_ours, mongo_host_port, pid_alive, port_open, proc_start_time, read_pid, read_pidfile, wait_port
from chatbus.supervisor import Paths, Supervisor, setting_env_keys

log = logging.getLogger(__name__)

WORKERS = ("safety", "retrieval", "inference", "recorder", "batches", "feedback")
ORDER = ("kafka", "ferretdb", *WORKERS, "edge")


class Stack(Supervisor):
    """The whole local stack: :data:`ORDER`'s services, started in that order and stopped in reverse."""

    # --- services ----------------------------------------------------------------------------------------
    def start_kafka(self) -> None:
        start_kafka(self)

    def start_ferretdb(self) -> None:
        start_ferretdb(self)

    def metrics_port(self, kind: str) -> int | None:
        """The Prometheus port a running worker serves ``/metrics`` on (the edge serves its own), or None."""
        path = self.paths.pids / f"{kind}.metrics"
        return int(path.read_text()) if path.exists() else None

    def start_worker(self, kind: str) -> int:
        """Start a worker with its own metrics port: ``metrics_base_port + i`` when that is set (the i-th of
        WORKERS), else a free port; the port is recorded next to the pid file (``chatbus stack status``)."""
        existing = self.running(kind)
        if existing:
            return existing
        port = self.settings.metrics_base_port + WORKERS.index(kind) if self.settings.metrics_base_port else free_port(self.settings.metrics_host)
        env = self.env()
        env["CHATBUS_METRICS_PORT"] = str(port)
        if kind == "inference" and self.settings.torch_threads == 0:
            # generation is where the time goes; the other stages are idle while a turn prefills and decodes.
            # Every core: Qwen2.5-0.5B bf16 prefills 1.7x and decodes 1.5x faster on 2 threads than on 1 (README)
            env["CHATBUS_TORCH_THREADS"] = str(os.cpu_count() or 1)
        pid = self.spawn(kind, [sys.executable, "-m", "chatbus.cli", "worker", kind], env)
        (self.paths.pids / f"{kind}.metrics").write_text(f"{port}\n")
        return pid

    def start_edge(self) -> int:
        return self.spawn("edge", [sys.executable, "-m", "chatbus.cli", "edge"])

    def start_keeper(self) -> int:
        """The keeper (:mod:`chatbus.keeper`) as a service of its own: restarts crashed services."""
        return self.spawn("keeper", [sys.executable, "-m", "chatbus.cli", "stack", "keep"])

    def start(self, name: str) -> None:
        """Start one service of :data:`ORDER` by name (the keeper restarts services with it)."""
        if name == "kafka":
            self.start_kafka()
        elif name == "ferretdb":
            self.start_ferretdb()
        elif name == "edge":
            self.start_edge()
        elif name in WORKERS:
            self.start_worker(name)
        else:
            raise StackError(f"unknown service {name!r}")

    @property
    def edge_url(self) -> str:
        return f"http://{self.settings.edge_host}:{self.settings.edge_port}"

    def wait_ready(self, timeout_s: float = 240) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, object] = {}
        while time.monotonic() < deadline:
            for name in (*WORKERS, "edge"):
                entry = read_pidfile(self.paths.pidfile(name))
                if entry is not None and not (pid_alive(entry[0]) and entry[1] in (None, proc_start_time(entry[0]))):
                    raise StackError(f"{name} exited; see {self.paths.logs / (name + '.log')}")
            try:
                r = httpx.get(f"{self.edge_url}/readyz", timeout=10)
                last = r.json()
                if r.status_code == 200:
                    return last
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise StackError(f"stack not ready within {timeout_s:.0f}s: {last}")

    def up(self, services: tuple[str, ...] = ORDER, wait: bool = True) -> None:
        """Start ``services`` (those not running yet). If that fails, stop what this call started, then raise."""
        from topics.clients import ensure_topics

        started: list[str] = []
        self._started = started
        try:
            if "kafka" in services:
                self.start_kafka()
                created = asyncio.run(ensure_topics(self.settings))
                if created:
                    log.info("created topics: %s", ", ".join(created))
            if "ferretdb" in services:
                self.start_ferretdb()
            for kind in WORKERS:
                if kind in services:
                    self.start_worker(kind)
            if "edge" in services:
                self.start_edge()
                if wait:
                    self.wait_ready()
        except BaseException:
            self._started = None
            if started:
                log.warning("start-up failed; stopping what it started: %s", ", ".join(started))
            for name in reversed(started):
                try:
                    self.stop(name)
                except Exception:  # keep stopping the rest; the start-up error is the one to raise
                    log.exception("could not stop %s", name)
            raise
        finally:
            self._started = None

    def down(self) -> list[str]:
        stopped = []
        if self.stop("keeper"):  # first, so nothing is restarted while the rest stops
            stopped.append("keeper")
        for name in reversed(ORDER):
            if self.stop(name):
                stopped.append(name)
        return stopped

    def status(self) -> dict[str, int | None]:
        return {name: self.running(name) for name in ORDER}


__all__ = [
    "ORDER",
    "WORKERS",
    "Paths",
    "Stack",
    "StackError",
    "Supervisor",
    "free_port",
    "host_port",
    "is_ours",
    "mongo_host_port",
    "pid_alive",
    "port_open",
    "proc_start_time",
    "read_pid",
    "read_pidfile",
    "setting_env_keys",
    "wait_port",
]
