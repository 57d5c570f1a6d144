"""The local stack's infrastructure, started under a :class:`~chatbus.supervisor.Supervisor`: Kafka (KRaft,
one node, or three for ``chatbus stack up --cluster``), FerretDB (SQLite) and, for a stack with several
retrieval workers, milvus-lite's gRPC server.

* Kafka's jars come from Maven Central (``tools/kafka/pom.xml``, copied to ``<build>/kafka-libs``); each
  node (broker and controller in one JVM) is started with ``java … kafka.Kafka`` after
  ``kafka.tools.StorageTool format``.
* FerretDB v1 is built from the Go module proxy (``tools/ferretdb``) into ``<build>/bin``.

None starts when its port is open already (a broker or database of the developer's own is used as is).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from chatbus.proc import StackError, host_port, mongo_host_port, port_open, wait_port
from chatbus.supervisor import Supervisor
from core.config import Settings

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


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node (broker and controller in one JVM) of the local stack."""

    service: str  # "kafka" for the first, "kafka-2", "kafka-3"... for the others
    node_id: int
    host: str
    port: int  # the PLAINTEXT listener, an entry of ``kafka_bootstrap``
    controller_port: int


def kafka_nodes(settings: Settings) -> list[KafkaNode]:
    """The nodes the local stack runs: one per ``kafka_bootstrap`` entry (one: the default single node; three
    for ``chatbus stack up --cluster``). Node *i* (from 0) listens on the *i*-th entry; its controller on
    ``kafka_controller_port + 100·i``."""
    addresses = [a.strip() for a in settings.kafka_bootstrap.split(",") if a.strip()]
    nodes = []
    for i, address in enumerate(addresses):
        host, port = host_port(address)
        nodes.append(KafkaNode("kafka" if i == 0 else f"kafka-{i + 1}", i + 1, host, port, settings.kafka_controller_port + 100 * i))
    return nodes


def kafka_data_dir(settings: Settings, node: KafkaNode, count: int) -> Path:
    """``<state>/kafka`` for the single node; ``<state>/kafka-cluster/node-N`` for a cluster's (a single node's
    log dir, formatted for one voter, is never reused by a cluster or the other way round)."""
    return settings.state_dir / "kafka" if count == 1 else settings.state_dir / "kafka-cluster" / f"node-{node.node_id}"


def kafka_properties(settings: Settings, node: KafkaNode, nodes: list[KafkaNode], log_dir: Path) -> str:
    """``server.properties`` of one node. Internal topics (consumer offsets, transactions) are replicated on
    up to three nodes with a min ISR of up to two, like the registry's topics on a cluster."""
    rf = min(3, len(nodes))
    voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes)
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners=PLAINTEXT://{node.host}:{node.port},CONTROLLER://{node.host}:{node.controller_port}",
            f"advertised.listeners=PLAINTEXT://{node.host}:{node.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={log_dir}",
            "num.partitions=1",
            f"default.replication.factor={rf}",
            f"offsets.topic.replication.factor={rf}",
            "offsets.topic.num.partitions=8",
            f"transaction.state.log.replication.factor={rf}",
            f"transaction.state.log.min.isr={min(2, rf)}",
            "group.initial.rebalance.delay.ms=0",
            "group.min.session.timeout.ms=3000",
            "auto.create.topics.enable=false",
            # a killed leader's partitions move within seconds: brokers notice a dead peer after 6 s (default 9)
            "broker.session.timeout.ms=6000",
            "broker.heartbeat.interval.ms=1000",
            "",
        ]
    )


def _java(sup: Supervisor, data: Path) -> list[str]:
    libs = sup.paths.kafka_libs
    if not libs.is_dir() or not any(libs.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {libs}: run `make setup`")
    return ["java", "-Xms256m", "-Xmx768m", "-XX:+UseG1GC", f"-Dlog4j2.configurationFile={data / 'log4j2.yaml'}", "-cp", f"{libs}/*"]


def _cluster_id(settings: Settings, count: int) -> str:
    """One id for every node of the stack's cluster, kept beside their log dirs (formatting reads it)."""
    path = settings.state_dir / ("kafka" if count == 1 else "kafka-cluster") / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    cluster_id = "-"
    while cluster_id.startswith("-"):  # StorageTool would read a leading "-" as an option (1 in 64 ids)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id + "\n")
    return cluster_id


def _spawn_kafka_node(sup: Supervisor, node: KafkaNode, nodes: list[KafkaNode]) -> int | None:
    """Format the node's storage once, then start it; None if it runs already (or its port is taken)."""
    if sup.running(node.service) or port_open(node.host, node.port):
        return None
    data = kafka_data_dir(sup.settings, node, len(nodes))
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    props.write_text(kafka_properties(sup.settings, node, nodes, data / "log"))
    (data / "log4j2.yaml").write_text(LOG4J2)
    java = _java(sup, data)
    if not (data / "log" / "meta.properties").exists():
        cluster_id = _cluster_id(sup.settings, len(nodes))
        subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)], check=True, capture_output=True, env=sup.infra_env())
    return sup.spawn(node.service, [*java, "kafka.Kafka", str(props)], env=sup.infra_env())


def start_kafka(sup: Supervisor, service: str | None = None) -> None:
    """Start the stack's KRaft nodes (or only ``service``, e.g. ``kafka-2``) that do not run yet; return once
    their ports are open. A node's storage is formatted on its first start."""
    nodes = kafka_nodes(sup.settings)
    chosen = [n for n in nodes if service in (None, n.service)]
    if not chosen:
        raise StackError(f"unknown Kafka node {service!r}")
    pids = {n.service: _spawn_kafka_node(sup, n, nodes) for n in chosen}
    for n in chosen:
        pid = pids[n.service]
        if pid is not None:
            wait_port(n.host, n.port, 90, n.service, pid)


def start_ferretdb(sup: Supervisor) -> None:
    """Start FerretDB on its SQLite folder; return once its port is open."""
    host, port = mongo_host_port(sup.settings.mongo_uri)
    if sup.running("ferretdb") or port_open(host, port):
        return
    if not sup.paths.ferretdb_bin.exists():
        raise StackError(f"{sup.paths.ferretdb_bin} missing: run `make setup`")
    data = sup.settings.state_dir / "ferretdb"
    pid = sup.spawn("ferretdb", [str(sup.paths.ferretdb_bin), "-listen", f"{host}:{port}", "-sqlite-dir", str(data)], env=sup.infra_env())
    wait_port(host, port, 30, "ferretdb", pid)


def start_milvus(sup: Supervisor) -> None:
    """milvus-lite's gRPC server on the stack's knowledge-base folder, for stacks with several retrieval
    workers: milvus-lite holds a lock on its folder, so only one process may open it (the server), and the
    workers reach it over ``MILVUS_URI`` (``http://host:port``). Returns once its port is open."""
    host, port = host_port(sup.settings.milvus_uri.split("://", 1)[-1])
    if sup.running("milvus") or port_open(host, port):
        return
    data = sup.settings.state_dir / "milvus" / "chatbus.db"  # the folder a single worker opens as a local path
    data.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data), "--host", host, "--port", str(port)]
    pid = sup.spawn("milvus", argv, env=sup.infra_env())
    wait_port(host, port, 60, "milvus", pid)
