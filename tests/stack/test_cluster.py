"""The local cluster (``chatbus stack up --cluster``'s layout, smaller so CI can afford it): three KRaft
nodes, topics replicated three times with ``min.insync.replicas=2``, producers ``acks=all``, one process of
each worker kind. Killing the leader of the partition a turn streams on, in the middle of the turn, loses
and repeats nothing; new turns are served by the two nodes left; the node rejoins the ISR when it is back.

The inference worker runs the ``openai`` engine against a scripted upstream (:mod:`tests.upstream`), so
the answer is known word for word. ``bench/chaos.py --cluster`` runs the full layout (two edges, two
replicas of each worker) under steady traffic.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from chatbus.infra import kafka_nodes
from chatbus.stack import Stack
from core.config import Settings
from tests.conftest import cluster_stack_settings, eventually, read_topic, running_stack
from tests.upstream import Upstream, spawn_scripted_inference, stream_turn, text_of
from topics.clients import make_admin
from topics.registry import CHAT_REPLIES, CHAT_REQUESTS, topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
WORDS = 1500  # at 10 ms a word and one token event a word: ~15 s of stream


def script(prompt: str) -> str:
    return " ".join(f"word{i}" for i in range(WORDS))


EXPECTED = " ".join(f"word{i}" for i in range(WORDS)) + " "


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[Stack, Settings, Upstream]]:
    settings = cluster_stack_settings(
        tmp_path_factory.mktemp("chatbus-cluster"),
        brokers=3,
        mongo_db="chatbus_cluster",
        model=str(tiny_model_dir),
        served_model_name=MODEL,
        turn_timeout_s=120,
        resume_grace_s=30,
    )
    services = ("kafka", "ferretdb", "safety", "retrieval", "recorder", "edge")
    with Upstream(script, pace_s=0.01) as up, running_stack(settings, services, wait=False) as stack:
        assert [n for n in stack.services if n.startswith("kafka")] == ["kafka", "kafka-2", "kafka-3"]
        spawn_scripted_inference(stack, up, MODEL, coalesce_ms=0, coalesce_tokens=1, output_rail=False)
        stack.wait_ready()
        yield stack, settings, up


async def describe(settings: Settings, name: str) -> list[dict[str, Any]]:
    """The partitions of topic ``name``: ``partition``, ``leader``, ``replicas``, ``isr`` (node ids)."""
    admin = make_admin(settings)
    await admin.start()
    try:
        [desc] = await admin.describe_topics([name])
    finally:
        await admin.close()
    return sorted(
        ({"partition": p["partition"], "leader": p["leader"], "replicas": sorted(p["replicas"]), "isr": sorted(p["isr"])} for p in desc["partitions"]),
        key=lambda p: p["partition"],
    )


async def topic_config(settings: Settings, name: str) -> dict[str, str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        [resp] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
    finally:
        await admin.close()
    [resource] = resp.resources
    return {entry[0]: entry[1] for entry in resource[4]}


def body(content: str, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}], "max_tokens": 2000}


def prompt(template: str) -> str:
    return template.format(random.randint(10_000, 99_999_999))


async def test_the_registry_topics_have_three_replicas_and_a_min_isr_of_two(cluster: tuple[Stack, Settings, Upstream]) -> None:
    stack, settings, _ = cluster
    for name in (CHAT_REQUESTS, CHAT_REPLIES):
        physical = topic(name, settings.topic_prefix)
        parts = await describe(settings, physical)
        assert parts and all(p["replicas"] == [1, 2, 3] for p in parts), parts
        assert (await topic_config(settings, physical))["min.insync.replicas"] == "2"
    leaders = {p["leader"] for p in await describe(settings, topic(CHAT_REPLIES, settings.topic_prefix))}
    assert len(leaders) > 1, "the replies' partitions are led by more than one node"


async def test_killing_the_leader_of_a_streaming_turn_loses_and_repeats_nothing(cluster: tuple[Stack, Settings, Upstream]) -> None:
    stack, settings, up = cluster
    url = stack.edge_url
    replies = topic(CHAT_REPLIES, settings.topic_prefix)
    content = prompt("Tell me a long story about the sea, take {}.")
    marker = content[-12:]
    chunks: list[dict[str, Any]] = []
    streaming = asyncio.create_task(stream_turn(url, body(content, True), chunks))
    await eventually(lambda: asyncio.sleep(0, len(text_of(chunks)) > 60), 60, "the first words of the stream")

    # the node leading the reply partition this edge reads: every token event of the turn goes to it
    [leader] = [p["leader"] for p in await describe(settings, replies) if p["partition"] == settings.reply_partition]
    [victim] = [n.service for n in kafka_nodes(settings) if n.node_id == leader]
    stack.kill(victim)
    try:
        shown_at_kill = text_of(chunks)
        # two of three nodes left: min ISR 2 still holds, so new turns are served. Until the controller has
        # fenced the dead node (broker.session.timeout.ms, 6 s) its partitions have no leader: a turn published
        # then gets the fast 503 with Retry-After, and the client's retry is served.
        refused = 0
        async with httpx.AsyncClient(timeout=120) as http:
            for _ in range(10):
                r = await http.post(f"{url}/v1/chat/completions", json=body(prompt("Please write a short poem about autumn, version {}."), False))
                if r.status_code != 503:
                    break
                refused += 1
                assert r.headers["Retry-After"].isdigit(), r.headers
                await asyncio.sleep(min(5, int(r.headers["Retry-After"])))
        assert r.status_code == 200, r.text
        assert refused <= 3, f"{refused} refusals: the leader change took too long"
        assert r.json()["choices"][0]["message"]["content"] == EXPECTED

        assert await asyncio.wait_for(streaming, 150), "the stream did not end with [DONE]"
        assert text_of(chunks) == EXPECTED  # every word once, in order
        assert text_of(chunks).startswith(shown_at_kill)
        [fin] = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        assert fin["choices"][0]["finish_reason"] == "stop"
        assert up.started.count(marker) == 1, "the turn was not regenerated"
        assert not await read_topic(settings, "chat.dlq", fin["id"]), "a leader change is not a poison message"
        moved = [p for p in await describe(settings, replies) if p["partition"] == settings.reply_partition]
        assert moved[0]["leader"] != leader and leader not in moved[0]["isr"]
    finally:
        await asyncio.to_thread(stack.start, victim)

    async def rejoined() -> bool:
        return all(p["isr"] == [1, 2, 3] for p in await describe(settings, replies))

    await eventually(rejoined, 90, f"{victim} back in the ISR of every reply partition")
