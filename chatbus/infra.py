"""Kafka (KRaft, one node) and FerretDB (SQLite) for the local stack, started under a :class:`~chatbus.supervisor.Supervisor`.

* Kafka's jars come from Maven Central (``tools/kafka/pom.xml``, copied to ``<build>/kafka-libs``); the
  broker is started with ``java … kafka.Kafka`` after ``kafka.tools.StorageTool format``.
* FerretDB v1 is built from the Go module proxy (``tools/ferretdb``) into ``<build>/bin``.

Neither starts when its port is open already (a broker or database of the developer's own is used as is).
"""

from __future__ import annotations

import base64
import subprocess
import uuid

from chatbus.proc import StackError, host_port, mongo_host_port, port_open, wait_port
from chatbus.supervisor import Supervisor

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


def start_kafka(sup: Supervisor) -> None:
    """Format the KRaft storage once, then start the one-node broker+controller; return once its port is open."""
    host, port = host_port(sup.settings.kafka_bootstrap)
    if sup.running("kafka") or port_open(host, port):
        return
    libs = sup.paths.kafka_libs
    if not libs.is_dir() or not any(libs.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka jars missing in {libs}: run `make setup`")
    data = sup.settings.state_dir / "kafka"
    data.mkdir(parents=True, exist_ok=True)
    cport = sup.settings.kafka_controller_port
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
        subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)], check=True, capture_output=True, env=sup.infra_env())
    pid = sup.spawn("kafka", [*java, "kafka.Kafka", str(props)], env=sup.infra_env())
    wait_port(host, port, 90, "kafka", pid)


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
