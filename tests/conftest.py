"""Fixtures: one real local stack per test session (Kafka KRaft, FerretDB, the six workers, the edge).

Everything runs on free loopback ports with a fresh state folder, so a session never touches a stack
started with ``make up``. Helpers here read topics with a plain aiokafka consumer and poll with
deadlines rather than sleeping.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pymongo import AsyncMongoClient

from chatbus.stack import ORDER, Stack, free_port, port_open
from core.config import ROOT, Settings
from schemas.events import decode
from topics.clients import make_consumer, partitions_of
from topics.ops import read_records
from topics.registry import topic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = TypeVar("T")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from chatbus.tiny_model import build_tiny_model

    return build_tiny_model(ROOT / ".build" / "tiny-model")


def stack_settings(state: Path, **overrides: Any) -> Settings:
    """Settings for a stack of its own: free loopback ports, the state folder ``state``."""
    ports: dict[str, Any] = {
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "kafka_controller_port": free_port(),
        "mongo_uri": f"mongodb://127.0.0.1:{free_port()}/",
        "edge_port": free_port(),
    }
    return Settings(state_dir=state, **{**ports, **overrides})


def cluster_stack_settings(state: Path, brokers: int = 3, replicas: int = 1, **overrides: Any) -> Settings:
    """Settings for a local cluster of its own (:func:`chatbus.stack.cluster_settings`' layout): ``brokers``
    KRaft nodes on free loopback ports 100 apart (controllers likewise), replication ``min(3, brokers)``,
    ``replicas`` of each worker and edge (milvus-lite served on a free port when more than one)."""

    def free_run(count: int, stride: int) -> int:
        while True:
            base = free_port()
            if base + stride * (count - 1) < 65536 and all(not port_open("127.0.0.1", base + stride * i) for i in range(count)):
                return base

    kafka, controllers, edge = free_run(brokers, 100), free_run(brokers, 100), free_run(replicas, 1)
    return stack_settings(
        state,
        kafka_bootstrap=",".join(f"127.0.0.1:{kafka + 100 * i}" for i in range(brokers)),
        kafka_controller_port=controllers,
        kafka_replication_factor=min(3, brokers),
        replicas=replicas,
        milvus_uri=f"http://127.0.0.1:{free_port()}" if replicas > 1 else "",
        edge_port=edge,
        **overrides,
    )


@contextmanager
def running_stack(settings: Settings, services: tuple[str, ...] = ORDER, wait: bool = True) -> Iterator[Stack]:
    """Start ``services`` of ``settings``' stack (all by default; ``wait``: until ``/readyz`` says ready); on a
    failure print each service's log tail; stop it all."""
    s = Stack(settings)
    try:
        s.up(services, wait=wait)
        yield s
    except BaseException:
        for name in s.services:
            log = s.paths.logs / f"{name}.log"
            if log.exists():
                print(f"===== {name}.log (tail) =====\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        s.down()


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Settings:
    return stack_settings(
        tmp_path_factory.mktemp("chatbus-state"),
        mongo_db="chatbus_test",
        model=str(tiny_model_dir),
        served_model_name="chatbus-tiny-random",
        # a second model pool (topics.pools): the same tiny model under another name, with its own worker;
        # its new turns fall back to the primary when its pool is down (tests/stack/edge/test_model_pools.py)
        extra_models=f"chatbus-tiny-small={tiny_model_dir}",
        model_fallbacks="chatbus-tiny-small=chatbus-tiny-random",
        response_cache_models="chatbus-tiny-small",  # the exact response cache on the small pool only (test_response_cache.py)
        semantic_cache_models="chatbus-tiny-small",  # and the semantic cache (first questions only)
        prices={"chatbus-tiny-random": {"prompt": 1.5, "completion": 4.0}},  # USD per million tokens (GET /v1/usage)
        turn_timeout_s=90,
        max_inflight_turns=4,
        default_max_tokens=32,
        coalesce_ms=5,
        # the tiny model writes noise, which the output rail's answer head now and then takes for a harmful
        # answer; the rail is tested on scripted answers (tests/stack/inference_workers/test_output_rail.py)
        output_rail=False,
        edge_heartbeat_s=1.0,  # an edge silent 6 s is gone (tests/stack/inference_workers/test_durable_cancels.py)
        edge_timeout_s=6.0,
    )


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings) as s:
        yield s


@pytest.fixture(scope="session")
def edge_url(stack: Stack) -> str:
    return stack.edge_url


@pytest.fixture
async def mongo(settings: Settings, stack: Stack) -> AsyncIterator[Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri, serverSelectionTimeoutMS=5000)
    yield client[settings.mongo_db]
    await client.close()


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 30, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def read_topic(settings: Settings, name: str, correlation_id: str | None = None) -> list[Any]:
    """Every decodable event on a topic (from the beginning to the current end), optionally of one turn."""
    out: list[Any] = []
    for r in await read_records(settings, topic(name, settings.topic_prefix)):
        try:
            ev = decode(r.value)
        except ValueError:
            continue
        if correlation_id is None or getattr(ev, "correlation_id", None) == correlation_id:
            out.append(ev)
    return out


async def end_offsets(settings: Settings, name: str) -> dict[int, int]:
    physical = topic(name, settings.topic_prefix)
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, physical)
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


@contextmanager
def edge_process(stack: Stack, partition: int, **bounds: object) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run another edge process on the stack with these settings (e.g. ``admit_max_inflight=2``): its URL and process."""
    port = free_port()
    env = stack.env()
    env.update({"CHATBUS_EDGE_PORT": str(port), "CHATBUS_REPLY_PARTITION": str(partition), "CHATBUS_EDGE_ID": f"edge-test-{partition}"})
    env.update({f"CHATBUS_{k.upper()}": str(v) for k, v in bounds.items()})
    log = open(stack.paths.logs / f"edge-test-{partition}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "chatbus.cli", "edge"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "extra edge did not start"
            time.sleep(0.2)
        time.sleep(1.0)  # one consumer-lag reading
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)
        log.close()


@contextmanager
def extra_edge(stack: Stack, partition: int, **bounds: object) -> Iterator[str]:
    """Run another edge process on the stack with these settings (e.g. ``admit_max_inflight=2``)."""
    with edge_process(stack, partition, **bounds) as (url, _):
        yield url
