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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.config import ROOT, Settings

log = logging.getLogger(__name__)

WORKERS = ("safety", "retrieval", "inference", "recorder", "batches", "feedback")
ORDER = ("kafka", "ferretdb", *WORKERS, "edge")

LOG4J2 = """Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


class StackError(RuntimeError):
    pass


@dataclass
class Paths:
    settings: Settings

    @property
    def logs(self) -> Path:
        return self.settings.state_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.settings.state_dir / "pids"

    @property
    def kafka_libs(self) -> Path:
        return self.settings.build_dir / "kafka-libs"

    @property
    def ferretdb_bin(self) -> Path:
        return self.settings.build_dir / "bin" / "chatbus-ferretdb"

    def pidfile(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


def mongo_host_port(uri: str) -> tuple[str, int]:
    netloc = uri.split("://", 1)[-1].split("/", 1)[0].split(",")[0].rsplit("@", 1)[-1]
    return host_port(netloc if ":" in netloc else f"{netloc}:27017")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, timeout_s: float, name: str, proc_pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if proc_pid is not None and not pid_alive(proc_pid):
            raise StackError(f"{name} exited during start-up; see its log")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not open {host}:{port} within {timeout_s:.0f}s")
        time.sleep(0.2)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` from field 3 (state) on; ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields if len(fields) >= 20 else None


def proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat``: when the process started, in clock ticks after boot (zombies too)."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)  # a zombie (or a dying process) is not alive
    return fields is not None and fields[0] not in ("Z", "X", "x")


def read_environ(pid: int, settle_s: float = 1.0) -> list[bytes]:
    """``/proc/PID/environ`` as ``KEY=VALUE`` items (empty if unreadable).

    A process that is in the middle of ``execve`` (past closing its close-on-exec files, so ``Popen`` has
    returned, but before the kernel set up the new stack) shows an empty environment: wait that out."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return []
        if raw or not pid_alive(pid) or time.monotonic() >= deadline:
            return [item for item in raw.split(b"\0") if item]
        time.sleep(0.002)


def _environ_is_ours(pid: int, settings: Settings) -> bool:
    return f"CHATBUS_STATE_DIR={settings.state_dir}".encode() in read_environ(pid)


def is_ours(pid: int, settings: Settings, start_time: int | None = None) -> bool:
    """True if ``pid`` is alive and was started by this stack: its environment names our state dir and,
    when ``start_time`` is known (from the pid file), it started then (the pid was not reused)."""
    if not pid_alive(pid):
        return False
    if start_time is not None and proc_start_time(pid) != start_time:
        return False
    return _environ_is_ours(pid, settings)


def group_members(pgid: int) -> dict[int, int]:
    """Live processes (not zombies) in process group ``pgid``: pid -> start time."""
    members: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is not None and fields[0] not in ("Z", "X", "x") and int(fields[2]) == pgid:
            members[int(entry)] = int(fields[19])
    return members


def read_pidfile(path: Path) -> tuple[int, int | None] | None:
    """``(pid, start time)`` from a pid file; the start time is ``None`` in files that hold only a pid."""
    try:
        parts = path.read_text().split()
        pid = int(parts[0])
        start = int(parts[1]) if len(parts) > 1 else None
    except (OSError, ValueError, IndexError):
        return None
    return pid, start


def read_pid(path: Path) -> int | None:
    entry = read_pidfile(path)
    return entry[0] if entry is not None else None


def setting_env_keys(settings: Settings) -> set[str]:
    """The environment variables :meth:`Settings.child_env` may set (``CHATBUS_*`` and aliases such as ``MILVUS_URI``)."""
    return {
        field.validation_alias if isinstance(field.validation_alias, str) else f"CHATBUS_{name.upper()}"
        for name, field in type(settings).model_fields.items()
    }


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings)
        self._started: list[str] | None = None  # services started by the ``up`` in progress

    # --- process plumbing ------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment of the workers and the edge: every setting, secrets included."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_")}
        env.update(self.settings.child_env())
        if self.settings.torch_threads == 0:  # every process shares this host: do not oversubscribe its cores
            env["CHATBUS_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def infra_env(self) -> dict[str, str]:
        """The environment of Kafka and FerretDB: none of the settings (so none of the secrets, e.g.
        ``CHATBUS_API_KEYS``, ``CHATBUS_OPENAI_API_KEY``) but ``CHATBUS_STATE_DIR``, which :func:`is_ours` needs."""
        keys = setting_env_keys(self.settings)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_") and k not in keys}
        env["CHATBUS_STATE_DIR"] = str(self.settings.state_dir)
        return env

    def running(self, name: str) -> int | None:
        entry = read_pidfile(self.paths.pidfile(name))
        if entry is None:
            return None
        pid, start = entry
        if is_ours(pid, self.settings, start):
            return pid
        if start is not None:
            _reap_if_same(pid, start)  # our own exited child: do not leave it a zombie
        return None

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        existing = self.running(name)
        if existing:
            log.info("%s already running (pid %d)", name, existing)
            return existing
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.paths.pids.mkdir(parents=True, exist_ok=True)
        logf = open(self.paths.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else self.env(),
                start_new_session=True,
                cwd=ROOT,
            )
        finally:
            logf.close()
        start = proc_start_time(proc.pid)  # our unreaped child: readable even if it has exited already
        read_environ(proc.pid)  # returns once its exec is complete: from here on is_ours() recognises it
        self.paths.pidfile(name).write_text(f"{proc.pid} {start}\n" if start is not None else f"{proc.pid}\n")
        if self._started is not None:
            self._started.append(name)
        log.info("started %s (pid %d)", name, proc.pid)
        return proc.pid

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        """SIGTERM a service's process group, SIGKILL what is left after ``timeout_s``; False if it was not running.

        If the group's leader has died, the members of its group that are ours are stopped all the same."""
        return self._stop(name, signal.SIGTERM, timeout_s)

    def kill(self, name: str) -> None:
        """SIGKILL a service (tests use it to simulate a crash)."""
        self._stop(name, signal.SIGKILL, 10.0)

    def _targets(self, pgid: int, start: int | None, leader_ours: bool) -> dict[int, int]:
        """The processes to stop for the service whose session leader was ``pgid``: pid -> start time."""
        if leader_ours:
            return group_members(pgid)  # the whole group is ours: it is signalled with killpg
        now = proc_start_time(pgid)
        if now is not None and (pid_alive(pgid) or (start is not None and now != start)):
            return {}  # the pid belongs to another process now: its group, if any, is not ours
        # the leader is gone; its group lives on while any member does (so its pgid cannot have been reused)
        return {pid: st for pid, st in group_members(pgid).items() if (start is None or st >= start) and _environ_is_ours(pid, self.settings)}

    def _stop(self, name: str, sig: signal.Signals, timeout_s: float) -> bool:
        pidfile = self.paths.pidfile(name)
        entry = read_pidfile(pidfile)
        if entry is None:
            return False
        pgid, start = entry
        leader_ours = is_ours(pgid, self.settings, start)
        targets = self._targets(pgid, start, leader_ours)
        if not leader_ours and not targets:
            _reap_if_same(pgid, start)
            pidfile.unlink(missing_ok=True)
            return False
        if not leader_ours:
            log.warning("%s: leader (pid %d) is gone; stopping the %d survivors of its group", name, pgid, len(targets))

        def remaining() -> dict[int, int]:
            if leader_ours:
                return group_members(pgid)
            return {pid: st for pid, st in targets.items() if pid_alive(pid) and proc_start_time(pid) == st}

        def send(s: signal.Signals) -> None:
            if leader_ours:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, s)
                return
            for pid in remaining():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, s)

        def wait(seconds: float) -> dict[int, int]:
            deadline = time.monotonic() + seconds
            while True:
                _reap_if_same(pgid, start)
                left = remaining()
                if not left or time.monotonic() >= deadline:
                    return left
                time.sleep(0.05)

        send(sig)
        if wait(timeout_s) and sig != signal.SIGKILL:
            log.warning("%s did not stop in %.0fs; killing", name, timeout_s)
            send(signal.SIGKILL)
            if wait(5.0):
                log.warning("%s: processes of group %d survived SIGKILL", name, pgid)
        _reap_if_same(pgid, start)
        pidfile.unlink(missing_ok=True)
        log.info("stopped %s", name)
        return True

    # --- services ----------------------------------------------------------------------------------------
    def start_kafka(self) -> None:
        host, port = host_port(self.settings.kafka_bootstrap)
        if self.running("kafka") or port_open(host, port):
            return
        libs = self.paths.kafka_libs
        if not libs.is_dir() or not any(libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars missing in {libs}: run `make setup`")
        data = self.settings.state_dir / "kafka"
        data.mkdir(parents=True, exist_ok=True)
        cport = self.settings.kafka_controller_port
        props = data / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{host}:{cport}",
                    f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
                    f"advertised.listeners=PLAINTEXT://{host}:{port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={data / 'log'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=8",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "group.min.session.timeout.ms=3000",
                    "auto.create.topics.enable=false",
                    "",
                ]
            )
        )
        (data / "log4j2.yaml").write_text(LOG4J2)
        java = ["java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", f"-Dlog4j2.configurationFile={data / 'log4j2.yaml'}", "-cp", f"{libs}/*"]
        if not (data / "log" / "meta.properties").exists():
            cluster_id = "-"
            while cluster_id.startswith("-"):  # StorageTool would read a leading "-" as an option (1 in 64 ids)
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)], check=True, capture_output=True, env=self.infra_env())
        pid = self.spawn("kafka", [*java, "kafka.Kafka", str(props)], env=self.infra_env())
        wait_port(host, port, 90, "kafka", pid)

    def start_ferretdb(self) -> None:
        host, port = mongo_host_port(self.settings.mongo_uri)
        if self.running("ferretdb") or port_open(host, port):
            return
        if not self.paths.ferretdb_bin.exists():
            raise StackError(f"{self.paths.ferretdb_bin} missing: run `make setup`")
        data = self.settings.state_dir / "ferretdb"
        pid = self.spawn("ferretdb", [str(self.paths.ferretdb_bin), "-listen", f"{host}:{port}", "-sqlite-dir", str(data)], env=self.infra_env())
        wait_port(host, port, 30, "ferretdb", pid)

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
        for name in reversed(ORDER):
            if self.stop(name):
                stopped.append(name)
        return stopped

    def status(self) -> dict[str, int | None]:
        return {name: self.running(name) for name in ORDER}


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is an exited child of this process (else a no-op)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _reap_if_same(pid: int, start: int | None) -> None:
    """Reap ``pid`` unless it is known to be another process than the one started at ``start``."""
    if start is None or proc_start_time(pid) == start:
        _reap(pid)
