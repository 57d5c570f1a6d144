"""The local stack without Docker: Kafka (KRaft, one node), FerretDB (SQLite), the workers and the edge.

* Kafka's jars come from Maven Central (``tools/kafka/pom.xml``, copied to ``<build>/kafka-libs``); the
  broker is started with ``java … kafka.Kafka`` after ``kafka.tools.StorageTool format``.
* FerretDB v1 is built from the Go module proxy (``tools/ferretdb``) into ``<build>/bin``.
* Every process runs in its own session, logs to ``<state>/logs/NAME.log`` and leaves a pid file in
  ``<state>/pids``. ``down`` signals only processes whose pid file is ours *and* whose environment
  carries this stack's ``CHATBUS_STATE_DIR``, so it never touches anything it did not start.

``up`` and ``down`` are idempotent: a service already running (its pid alive) is left alone.
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

from chatbus.config import ROOT, Settings

log = logging.getLogger(__name__)

WORKERS = ("safety", "retrieval", "inference", "recorder")
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def is_ours(pid: int, settings: Settings) -> bool:
    """True if ``pid`` is alive and was started by this stack (its environment names our state dir)."""
    if not pid_alive(pid):
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"CHATBUS_STATE_DIR={settings.state_dir}".encode() in environ


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings)

    # --- process plumbing ------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATBUS_")}
        env.update(self.settings.child_env())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def running(self, name: str) -> int | None:
        pid = read_pid(self.paths.pidfile(name))
        return pid if pid is not None and is_ours(pid, self.settings) else None

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        existing = self.running(name)
        if existing:
            log.info("%s already running (pid %d)", name, existing)
            return existing
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self.paths.pids.mkdir(parents=True, exist_ok=True)
        logf = open(self.paths.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env or self.env(), start_new_session=True, cwd=ROOT)
        logf.close()
        self.paths.pidfile(name).write_text(str(proc.pid))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc.pid

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        pidfile = self.paths.pidfile(name)
        pid = read_pid(pidfile)
        if pid is None:
            return False
        if not is_ours(pid, self.settings):
            pidfile.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
            _reap(pid)
        if pid_alive(pid):
            log.warning("%s did not stop in %.0fs; killing", name, timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        pidfile.unlink(missing_ok=True)
        log.info("stopped %s", name)
        return True

    def kill(self, name: str) -> None:
        """SIGKILL a service (tests use it to simulate a crash)."""
        pid = self.running(name)
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
        self.paths.pidfile(name).unlink(missing_ok=True)

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
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)], check=True, capture_output=True)
        pid = self.spawn("kafka", [*java, "kafka.Kafka", str(props)])
        wait_port(host, port, 90, "kafka", pid)

    def start_ferretdb(self) -> None:
        host, port = mongo_host_port(self.settings.mongo_uri)
        if self.running("ferretdb") or port_open(host, port):
            return
        if not self.paths.ferretdb_bin.exists():
            raise StackError(f"{self.paths.ferretdb_bin} missing: run `make setup`")
        data = self.settings.state_dir / "ferretdb"
        pid = self.spawn("ferretdb", [str(self.paths.ferretdb_bin), "-listen", f"{host}:{port}", "-sqlite-dir", str(data)])
        wait_port(host, port, 30, "ferretdb", pid)

    def start_worker(self, kind: str) -> int:
        return self.spawn(kind, [sys.executable, "-m", "chatbus.cli", "worker", kind])

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
                pid = read_pid(self.paths.pidfile(name))
                if pid is not None and not pid_alive(pid):
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
        from topics.clients import ensure_topics

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

    def down(self) -> list[str]:
        stopped = []
        for name in reversed(ORDER):
            if self.stop(name):
                stopped.append(name)
        return stopped

    def status(self) -> dict[str, int | None]:
        return {name: self.running(name) for name in ORDER}


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
