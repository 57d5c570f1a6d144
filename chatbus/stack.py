"""The local stack without Docker: Kafka (KRaft), FerretDB (SQLite), the workers and the edge.

By default one Kafka node and one process of each worker kind and of the edge (what ``make run`` starts).
``chatbus stack up --cluster`` (:func:`cluster_settings`) starts three KRaft nodes (topics replicated three
times, ``min.insync.replicas=2``, producers ``acks=all``), two edges and two replicas of each worker kind,
with milvus-lite served over gRPC so both retrieval workers share the knowledge base. A replica's service
name is its kind with its number (``kafka-2``, ``inference-2``, ``edge-2``); the first keeps the plain name.

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

from chatbus.infra import kafka_nodes, start_ferretdb, start_kafka, start_milvus
from chatbus.proc import StackError, free_port, host_port, is_ours, mongo_host_port, pid_alive, port_open, proc_start_time, read_pid, read_pidfile, wait_port
from chatbus.supervisor import Paths, Supervisor, setting_env_keys
from core.config import Settings
from topics.pools import pools

log = logging.getLogger(__name__)

WORKERS = ("safety", "retrieval", "inference", "recorder", "batches", "feedback")
ORDER = ("kafka", "ferretdb", *WORKERS, "edge")  # the single-node stack's services, in start order
CLUSTER_BROKERS = 3
CLUSTER_REPLICAS = 2
MILVUS_PORT = 19530


def replica_name(kind: str, number: int) -> str:
    """The service name of replica ``number`` (from 1) of ``kind``: ``inference``, ``inference-2``, …"""
    return kind if number == 1 else f"{kind}-{number}"


def kind_of(service: str) -> str:
    """``inference-2`` -> ``inference``; ``kafka-3`` -> ``kafka``; an extra model pool's worker
    ``inference.<pool>`` (topics.pools) -> ``inference``; a plain name is its own kind."""
    base, _, number = service.rpartition("-")
    kind = base if base and number.isdigit() else service
    return "inference" if kind.startswith("inference.") else kind


def pool_of_service(service: str) -> str:
    """``inference.smollm2-135m-instruct-2`` -> ``smollm2-135m-instruct`` (a pool's slug); ``""`` for the primary's workers."""
    base, _, number = service.rpartition("-")
    name = base if base and number.isdigit() else service
    return name.removeprefix("inference.") if name.startswith("inference.") else ""


def replica_number(service: str) -> int:
    base, _, number = service.rpartition("-")
    return int(number) if base and number.isdigit() else 1


def cluster_settings(settings: Settings, brokers: int = CLUSTER_BROKERS, replicas: int = CLUSTER_REPLICAS) -> Settings:
    """``settings`` for the opt-in local cluster: ``brokers`` KRaft nodes on the first bootstrap port and the
    ports 100, 200… above it (controllers likewise above ``kafka_controller_port``), replication factor
    ``min(3, brokers)``, ``replicas`` of each worker kind and edge (edge *j* on ``edge_port + j``), milvus-lite
    served on 19530 unless ``MILVUS_URI`` is set, and its own state folder (``<state>/cluster``)."""
    host, port = host_port(settings.kafka_bootstrap.split(",")[0])
    update: dict[str, object] = {
        "kafka_bootstrap": ",".join(f"{host}:{port + 100 * i}" for i in range(brokers)),
        "kafka_replication_factor": min(3, brokers),
        "replicas": replicas,
        "state_dir": settings.state_dir / "cluster",
    }
    if not settings.milvus_uri:
        update["milvus_uri"] = f"http://{host}:{MILVUS_PORT}"
    return settings.model_copy(update=update)


class Stack(Supervisor):
    """The whole local stack: :attr:`services`, started in that order and stopped in reverse."""

    @property
    def services(self) -> tuple[str, ...]:
        """Every service of this stack in start order: the Kafka nodes, FerretDB, milvus-lite's server when
        several retrieval workers share it, ``replicas`` of each worker kind, then the edges."""
        n = max(1, self.settings.replicas)
        kafka = tuple(node.service for node in kafka_nodes(self.settings))
        milvus = ("milvus",) if self.serves_milvus else ()
        workers = tuple(replica_name(kind, j) for kind in WORKERS for j in range(1, n + 1))
        # one inference worker (per replica) for each extra model's pool, after the primary's (topics.pools)
        workers += tuple(replica_name(pool.service, j) for pool in pools(self.settings)[1:] for j in range(1, n + 1))
        return (*kafka, "ferretdb", *milvus, *workers, *(replica_name("edge", j) for j in range(1, n + 1)))

    @property
    def serves_milvus(self) -> bool:
        """Several retrieval workers and ``MILVUS_URI`` on this host: the stack runs milvus-lite's server there."""
        uri = self.settings.milvus_uri
        return self.settings.replicas > 1 and uri.startswith("http://") and host_port(uri.split("://", 1)[1].rstrip("/"))[0] in ("127.0.0.1", "localhost")

    # --- services ----------------------------------------------------------------------------------------
    def start_kafka(self, service: str | None = None) -> None:
        start_kafka(self, service)

    def start_ferretdb(self) -> None:
        start_ferretdb(self)

    def metrics_port(self, kind: str) -> int | None:
        """The Prometheus port a running worker serves ``/metrics`` on (the edge serves its own), or None."""
        path = self.paths.pids / f"{kind}.metrics"
        return int(path.read_text()) if path.exists() else None

    def start_worker(self, name: str) -> int:
        """Start a worker (``inference`` or a replica such as ``inference-2``) with its own metrics port:
        ``metrics_base_port + i`` when that is set (the i-th of WORKERS, plus ``len(WORKERS)`` per replica
        number above 1), else a free port; the port is recorded next to the pid file (``chatbus stack status``)."""
        existing = self.running(name)
        if existing:
            return existing
        kind = kind_of(name)
        slug = pool_of_service(name)
        offset = WORKERS.index(kind) + len(WORKERS) * (replica_number(name) - 1)
        based = self.settings.metrics_base_port and not slug  # an extra pool's worker takes a free port
        port = self.settings.metrics_base_port + offset if based else free_port(self.settings.metrics_host)
        env = self.env()
        env["CHATBUS_METRICS_PORT"] = str(port)
        if slug:
            env["CHATBUS_POOL"] = next(p.name for p in pools(self.settings) if p.slug == slug)
        if kind == "inference" and self.settings.torch_threads == 0:
            # generation is where the time goes; the other stages are idle while a turn prefills and decodes.
            # Every core: Qwen2.5-0.5B bf16 prefills 1.7x and decodes 1.5x faster on 2 threads than on 1 (README)
            env["CHATBUS_TORCH_THREADS"] = str(os.cpu_count() or 1)
        pid = self.spawn(name, [sys.executable, "-m", "chatbus.cli", "worker", kind], env)
        (self.paths.pids / f"{name}.metrics").write_text(f"{port}\n")
        return pid

    def start_edge(self, name: str = "edge") -> int:
        """Start an edge; edge *j* (``edge-2``…) listens on ``edge_port + j - 1`` and reads reply partition
        ``j - 1`` (:attr:`edge_urls`)."""
        j = replica_number(name)
        env = self.env()
        if j > 1:
            env.update({"CHATBUS_EDGE_PORT": str(self.settings.edge_port + j - 1), "CHATBUS_REPLY_PARTITION": str(j - 1), "CHATBUS_EDGE_ID": f"edge-{j - 1}"})
        return self.spawn(name, [sys.executable, "-m", "chatbus.cli", "edge"], env)

    def start_milvus(self) -> None:
        start_milvus(self)

    def start_keeper(self) -> int:
        """The keeper (:mod:`chatbus.keeper`) as a service of its own: restarts crashed services."""
        return self.spawn("keeper", [sys.executable, "-m", "chatbus.cli", "stack", "keep"])

    def start(self, name: str) -> None:
        """Start one of :attr:`services` by name (the keeper restarts services with it); StackError for another name."""
        kind = kind_of(name)
        if name not in self.services:
            raise StackError(f"unknown service {name!r}")
        if kind == "kafka":
            self.start_kafka(name)
        elif kind == "ferretdb":
            self.start_ferretdb()
        elif kind == "milvus":
            self.start_milvus()
        elif kind == "edge":
            self.start_edge(name)
        elif kind in WORKERS:
            self.start_worker(name)
        else:
            raise StackError(f"unknown service {name!r}")

    @property
    def edge_url(self) -> str:
        return f"http://{self.settings.edge_host}:{self.settings.edge_port}"

    @property
    def edge_urls(self) -> list[str]:
        """Every edge's base URL (one per replica)."""
        return [f"http://{self.settings.edge_host}:{self.settings.edge_port + j}" for j in range(max(1, self.settings.replicas))]

    def wait_ready(self, timeout_s: float = 240) -> dict[str, object]:
        """Wait until every edge's ``/readyz`` is 200; raise if a worker or edge exits meanwhile. Returns the
        first edge's ``/readyz`` body."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, object] = {}
        pending = self.edge_urls
        first: dict[str, object] | None = None
        while time.monotonic() < deadline:
            for name in self.services:
                if kind_of(name) not in (*WORKERS, "edge"):
                    continue
                entry = read_pidfile(self.paths.pidfile(name))
                if entry is not None and not (pid_alive(entry[0]) and entry[1] in (None, proc_start_time(entry[0]))):
                    raise StackError(f"{name} exited; see {self.paths.logs / (name + '.log')}")
            for url in list(pending):
                try:
                    r = httpx.get(f"{url}/readyz", timeout=10)
                    last = r.json()
                    if r.status_code == 200:
                        pending.remove(url)
                        if url == self.edge_url:
                            first = last
                except (httpx.HTTPError, ValueError):
                    pass
            if not pending:
                return first if first is not None else last
            time.sleep(0.5)
        raise StackError(f"stack not ready within {timeout_s:.0f}s: {last}")

    def up(self, services: tuple[str, ...] | None = None, wait: bool = True) -> None:
        """Start ``services`` (default: all of :attr:`services`; a kind such as ``inference`` also starts
        its replicas; those running already are left alone). If that fails, stop what this call started,
        then raise."""
        from topics.clients import ensure_topics

        wanted = [name for name in self.services if services is None or name in services or kind_of(name) in services]
        started: list[str] = []
        self._started = started
        try:
            if any(kind_of(name) == "kafka" for name in wanted):
                self.start_kafka()
                created = asyncio.run(ensure_topics(self.settings))
                if created:
                    log.info("created topics: %s", ", ".join(created))
            for name in wanted:
                if kind_of(name) != "kafka":
                    self.start(name)
            if wait and any(kind_of(name) == "edge" for name in wanted):
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
        # every pid file, not only today's services: a stack started with other replica counts stops whole
        known = self.services
        others = sorted({p.stem for p in self.paths.pids.glob("*.pid")} - set(known) - {"keeper"}) if self.paths.pids.is_dir() else []
        for name in [*reversed(known), *others]:
            if self.stop(name):
                stopped.append(name)
        return stopped

    def status(self) -> dict[str, int | None]:
        return {name: self.running(name) for name in self.services}


__all__ = [
    "ORDER",
    "WORKERS",
    "cluster_settings",
    "kind_of",
    "replica_name",
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
