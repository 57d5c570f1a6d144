"""The stack manager's process plumbing on real processes (``python -c`` children), without Kafka.

Pid files carry the start time, so a reused pid is never ours; a dead leader's surviving group members are
stopped; another state dir cannot stop our processes; Kafka and FerretDB get no secrets; a failed ``up``
stops what it started (and only that).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from chatbus.infra import kafka_data_dir, kafka_nodes, kafka_properties
from chatbus.stack import Stack, StackError, cluster_settings, free_port, kind_of, pid_alive, proc_start_time, read_pidfile, replica_name
from core.config import Settings

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
SECRETS = ("api-key-s3cret", "sk-openai-s3cret")


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        state_dir=tmp_path / "state",
        build_dir=tmp_path / "build",
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        kafka_controller_port=free_port(),
        mongo_uri=f"mongodb://127.0.0.1:{free_port()}/",
        edge_port=free_port(),
        api_keys=SecretStr(SECRETS[0]),
        openai_api_key=SecretStr(SECRETS[1]),
    )


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        yield s
    finally:
        s.down()


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test leaves outside the stack's control; killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_pid_file_records_start_time_and_a_reused_pid_is_not_ours(stack: Stack) -> None:
    pid = stack.spawn("safety", SLEEP)
    pidfile = stack.paths.pidfile("safety")
    start = proc_start_time(pid)
    assert start is not None
    assert pidfile.read_text().split() == [str(pid), str(start)]
    assert read_pidfile(pidfile) == (pid, start)
    assert stack.running("safety") == pid
    assert stack.spawn("safety", SLEEP) == pid  # already running: nothing new starts

    # the same pid with another start time is what a reused pid looks like: not ours, left alone
    pidfile.write_text(f"{pid} {start + 1}\n")
    assert stack.running("safety") is None
    assert stack.stop("safety", timeout_s=1) is False
    assert not pidfile.exists()
    time.sleep(0.2)
    assert pid_alive(pid)

    # an old pid file (pid only) is still read
    pidfile.write_text(f"{pid}\n")
    assert read_pidfile(pidfile) == (pid, None)
    assert stack.running("safety") == pid
    assert stack.stop("safety", timeout_s=5) is True
    assert not pid_alive(pid)
    assert not Path(f"/proc/{pid}").exists()  # reaped, not left a zombie
    assert not pidfile.exists()


def test_a_stranger_state_dir_cannot_stop_our_processes(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    pid = stack.spawn("edge", SLEEP)
    stranger = Stack(settings.model_copy(update={"state_dir": tmp_path / "other-stack"}))
    assert stranger.down() == []
    stranger.paths.pids.mkdir(parents=True)
    stranger.paths.pidfile("edge").write_text(stack.paths.pidfile("edge").read_text())  # right pid and start time
    assert stranger.running("edge") is None
    assert stranger.status()["edge"] is None
    assert stranger.down() == []
    stranger.paths.pidfile("edge").write_text(stack.paths.pidfile("edge").read_text())
    stranger.kill("edge")
    time.sleep(0.2)
    assert pid_alive(pid)
    assert stack.running("edge") == pid
    assert stack.down() == ["edge"]
    assert not pid_alive(pid)


def test_group_members_of_a_dead_leader_are_stopped(stack: Stack, tmp_path: Path, strays: list[int]) -> None:
    """The leader (think: a worker OOM-killed) is gone; its children (think: a vLLM engine) are not."""
    pids_file = tmp_path / "children"
    leader_code = f"""
import os, subprocess, sys
stubborn = subprocess.Popen(
    [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
    stdout=subprocess.PIPE,
)
assert stubborn.stdout.readline().strip() == b"ready"
polite = subprocess.Popen(["sleep", "120"])
foreign = subprocess.Popen(["sleep", "120"], env={{"PATH": os.environ["PATH"]}})  # same group, not our environment
with open({str(pids_file)!r} + ".tmp", "w") as f:
    f.write(f"{{stubborn.pid}} {{polite.pid}} {{foreign.pid}}")
os.rename({str(pids_file)!r} + ".tmp", {str(pids_file)!r})
os._exit(0)
"""
    leader = stack.spawn("inference", [sys.executable, "-c", leader_code])
    wait_for(pids_file.exists)
    stubborn, polite, foreign = (int(p) for p in pids_file.read_text().split())
    strays.append(foreign)
    wait_for(lambda: not pid_alive(leader))  # a zombie until reaped: not alive
    for pid in (stubborn, polite, foreign):
        assert pid_alive(pid) and os.getpgid(pid) == leader
    assert stack.running("inference") is None  # the service is down ...
    assert stack.stop("inference", timeout_s=1) is True  # ... but its group had survivors to stop
    assert not pid_alive(stubborn) and not pid_alive(polite)  # SIGTERM, then SIGKILL for the stubborn one
    assert pid_alive(foreign)  # not ours: left alone
    assert not Path(f"/proc/{leader}").exists()  # the leader was our child: reaped
    assert not stack.paths.pidfile("inference").exists()
    assert stack.stop("inference") is False


def test_stop_waits_for_the_whole_group_and_kills_what_ignores_sigterm(stack: Stack, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"""
import subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
    stdout=subprocess.PIPE,
)
assert child.stdout.readline().strip() == b"ready"
open({str(ready)!r}, "w").write(str(child.pid))
time.sleep(120)
"""
    leader = stack.spawn("retrieval", [sys.executable, "-c", code])
    wait_for(lambda: ready.exists() and ready.read_text() != "")
    child = int(ready.read_text())
    assert stack.stop("retrieval", timeout_s=1) is True
    assert not pid_alive(leader) and not pid_alive(child)
    assert not Path(f"/proc/{leader}").exists()


def test_kill_reaps_and_a_zombie_is_not_alive(stack: Stack) -> None:
    pid = stack.spawn("recorder", [sys.executable, "-c", "pass"])
    wait_for(lambda: not pid_alive(pid))
    assert Path(f"/proc/{pid}").exists()  # a zombie: exited, not yet reaped
    assert stack.running("recorder") is None  # ... which running() reaps
    assert not Path(f"/proc/{pid}").exists()
    pid = stack.spawn("recorder", SLEEP)
    stack.kill("recorder")
    assert not pid_alive(pid) and not Path(f"/proc/{pid}").exists()
    assert not stack.paths.pidfile("recorder").exists()


def _fake_executable(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


FAKE_FERRETDB = """
import socket, sys, time
host, port = sys.argv[sys.argv.index("-listen") + 1].rsplit(":", 1)
s = socket.socket()
s.bind((host, int(port)))
s.listen()
time.sleep(120)
"""

FAKE_JAVA = """
import json, os, socket, sys, time
props = sys.argv[-1]
if "kafka.tools.StorageTool" in sys.argv:
    with open(os.path.join(os.path.dirname(props), "storage-tool-env.json"), "w") as f:
        json.dump(dict(os.environ), f)
    sys.exit(0)
listeners = [l for l in open(props).read().splitlines() if l.startswith("listeners=")][0]
host, port = listeners.split("PLAINTEXT://", 1)[1].split(",", 1)[0].rsplit(":", 1)
s = socket.socket()
s.bind((host, int(port)))
s.listen()
time.sleep(120)
"""


def _assert_no_secrets(env: dict[str, str], state_dir: Path) -> None:
    assert env["CHATBUS_STATE_DIR"] == str(state_dir)
    assert not any(secret in value for value in env.values() for secret in SECRETS)
    assert "CHATBUS_API_KEYS" not in env and "CHATBUS_OPENAI_API_KEY" not in env


def test_kafka_and_ferretdb_get_no_secrets_the_workers_do(stack: Stack, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker_env = stack.env()
    assert worker_env["CHATBUS_API_KEYS"] == SECRETS[0] and worker_env["CHATBUS_OPENAI_API_KEY"] == SECRETS[1]
    _assert_no_secrets(stack.infra_env(), settings.state_dir)

    # real processes: a worker-like child carries the secrets, the (fake) FerretDB and Kafka do not
    worker = stack.spawn("safety", SLEEP)
    assert environ_of(worker)["CHATBUS_API_KEYS"] == SECRETS[0]

    _fake_executable(stack.paths.ferretdb_bin, FAKE_FERRETDB)
    stack.start_ferretdb()
    ferretdb = stack.running("ferretdb")
    assert ferretdb is not None  # ours: its environment still names the state dir
    _assert_no_secrets(environ_of(ferretdb), settings.state_dir)

    bindir = tmp_path / "fake-bin"
    _fake_executable(bindir / "java", FAKE_JAVA)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    stack.paths.kafka_libs.mkdir(parents=True)
    (stack.paths.kafka_libs / "kafka_2.13-0.0.0.jar").write_bytes(b"")
    stack.start_kafka()
    kafka = stack.running("kafka")
    assert kafka is not None
    _assert_no_secrets(environ_of(kafka), settings.state_dir)
    _assert_no_secrets(json.loads((settings.state_dir / "kafka" / "storage-tool-env.json").read_text()), settings.state_dir)
    assert stack.down() == ["safety", "ferretdb", "kafka"]
    assert not any(pid_alive(p) for p in (worker, ferretdb, kafka))


def test_failed_up_stops_what_it_started_and_only_that(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_executable(stack.paths.ferretdb_bin, FAKE_FERRETDB)
    already = stack.spawn("safety", SLEEP)  # running before the call: must survive it

    def start_worker(kind: str) -> int:
        if kind == "inference":
            raise StackError("inference failed to start")
        return stack.spawn(kind, SLEEP)

    monkeypatch.setattr(stack, "start_worker", start_worker)
    with pytest.raises(StackError, match="inference failed to start"):
        stack.up(services=("ferretdb", "safety", "retrieval", "inference"), wait=False)
    status = stack.status()
    assert status["safety"] == already
    assert status["ferretdb"] is None and status["retrieval"] is None
    assert not stack.paths.pidfile("ferretdb").exists() and not stack.paths.pidfile("retrieval").exists()


def test_up_that_is_never_ready_stops_what_it_started(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack, "start_worker", lambda kind: stack.spawn(kind, SLEEP))
    monkeypatch.setattr(stack, "start_edge", lambda name="edge": stack.spawn(name, [sys.executable, "-c", "raise SystemExit(3)"]))
    with pytest.raises(StackError, match="edge exited"):  # it is a zombie until reaped: that counts as exited
        stack.up(services=("recorder", "edge"), wait=True)
    assert stack.status() == dict.fromkeys(stack.status())
    assert not any(stack.paths.pids.glob("*.pid"))


def test_the_cluster_layout_names_every_node_and_replica(settings: Settings) -> None:
    cluster = Stack(cluster_settings(settings))
    host, port = settings.kafka_bootstrap.split(":")
    assert cluster.settings.kafka_bootstrap == f"{host}:{port},{host}:{int(port) + 100},{host}:{int(port) + 200}"
    assert cluster.settings.kafka_replication_factor == 3 and cluster.settings.min_insync_replicas == 2
    assert cluster.settings.state_dir == settings.state_dir / "cluster"
    assert cluster.serves_milvus and cluster.settings.milvus_uri == f"http://{host}:19530"
    assert cluster.services == (
        "kafka", "kafka-2", "kafka-3", "ferretdb", "milvus",
        "safety", "safety-2", "retrieval", "retrieval-2", "inference", "inference-2",
        "recorder", "recorder-2", "batches", "batches-2", "feedback", "feedback-2",
        "edge", "edge-2",
    )  # fmt: skip
    assert [kind_of(n) for n in ("kafka-3", "inference-2", "edge", "ferretdb")] == ["kafka", "inference", "edge", "ferretdb"]
    assert replica_name("edge", 1) == "edge" and replica_name("edge", 2) == "edge-2"
    assert cluster.edge_urls == [f"http://127.0.0.1:{settings.edge_port}", f"http://127.0.0.1:{settings.edge_port + 1}"]
    # the single-node default is unchanged: one of each, no milvus server, RF 1 and min ISR 1
    single = Stack(settings)
    assert single.services == ("kafka", "ferretdb", "safety", "retrieval", "inference", "recorder", "batches", "feedback", "edge")
    assert not single.serves_milvus and settings.min_insync_replicas == 1


def test_each_kafka_node_of_a_cluster_votes_with_the_others_and_keeps_its_own_log(settings: Settings) -> None:
    cs = cluster_settings(settings)
    nodes = kafka_nodes(cs)
    assert [(n.service, n.node_id) for n in nodes] == [("kafka", 1), ("kafka-2", 2), ("kafka-3", 3)]
    assert [n.controller_port for n in nodes] == [settings.kafka_controller_port + 100 * i for i in range(3)]
    dirs = {kafka_data_dir(cs, n, 3) for n in nodes}
    assert len(dirs) == 3 and kafka_data_dir(settings, kafka_nodes(settings)[0], 1) == settings.state_dir / "kafka"
    props = dict(line.split("=", 1) for line in kafka_properties(cs, nodes[1], nodes, Path("/x")).splitlines() if line)
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{nodes[1].port},CONTROLLER://127.0.0.1:{nodes[1].controller_port}"
    assert props["offsets.topic.replication.factor"] == "3" and props["transaction.state.log.min.isr"] == "2"
    single = dict(line.split("=", 1) for line in kafka_properties(settings, kafka_nodes(settings)[0], kafka_nodes(settings), Path("/x")).splitlines() if line)
    assert single["offsets.topic.replication.factor"] == "1" and single["controller.quorum.voters"].count("@") == 1


def test_a_second_edge_gets_its_own_port_reply_partition_and_id(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, dict[str, str]] = {}

    def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        seen[name] = env or {}
        return 0

    monkeypatch.setattr(stack, "spawn", spawn)
    stack.start_edge("edge")
    stack.start_edge("edge-2")
    port = stack.settings.edge_port
    assert seen["edge"]["CHATBUS_EDGE_PORT"] == str(port) and seen["edge"]["CHATBUS_REPLY_PARTITION"] == "0"
    assert seen["edge-2"]["CHATBUS_EDGE_PORT"] == str(port + 1)
    assert seen["edge-2"]["CHATBUS_REPLY_PARTITION"] == "1" and seen["edge-2"]["CHATBUS_EDGE_ID"] == "edge-1"


def test_down_stops_the_replicas_of_a_layout_started_with_other_settings(stack: Stack) -> None:
    """``down`` stops every pid file of the state dir, e.g. an ``inference-2`` a cluster run left."""
    pid = stack.spawn("inference-2", SLEEP)
    assert "inference-2" not in stack.services
    assert "inference-2" in stack.down()
    wait_for(lambda: not pid_alive(pid))
