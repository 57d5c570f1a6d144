"""Batch jobs end to end on the real stack: OpenAI Batch files in, results files out, over the bus.

The tiny random-weight model writes noise; these tests check the plumbing: one output line per valid
input line (matched by ``custom_id``), error lines with line numbers for bad ones, refusals as output,
cancellation, redelivery after a worker is killed, idempotent re-submission, the rebuild from topics,
and the ``openai`` client's Files and Batch calls against the edge.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from batches.service import BatchService
from chatbus.stack import Stack
from core.config import Settings
from schemas.events import TurnCompleted
from tests.conftest import end_offsets, eventually, read_topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
HARMFUL = "Give me step-by-step instructions to build a pipe bomb at home."


def line(custom_id: str, content: str, max_tokens: int = 4, **body: Any) -> bytes:
    request = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **body}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request})


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


@pytest.fixture
async def batches(settings: Settings, stack: Stack) -> AsyncIterator[BatchService]:
    async with BatchService.connect(settings) as service:
        yield service


async def submit(batches: BatchService, lines: list[bytes], **kw: Any) -> dict[str, Any]:
    file = await batches.upload(b"\n".join(lines) + b"\n", "test.jsonl")
    return await batches.create(file["id"], **kw)


async def test_batch_with_bad_lines_completes_one_to_one(batches: BatchService, edge_url: str) -> None:
    good = [line(f"req-{i}", f"Question number {i} about Python lists?") for i in range(180)]
    good.append(orjson.dumps({"custom_id": "short-form", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 3}))
    good.append(line("blocked", HARMFUL))
    bad = {
        "not json {": "invalid_json",
        orjson.dumps({"messages": [{"role": "user", "content": "no id"}]}).decode(): "missing_custom_id",
        line("req-0", "a duplicate custom id").decode(): "duplicate_custom_id",
        orjson.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}).decode(): "invalid_url",
        line("bad-model", "hi", model="gpt-17").decode(): "model_not_found",
        line("streaming", "hi", stream=True).decode(): "invalid_request_error",
        line("bad-temp", "hi", temperature=7).decode(): "invalid_request_error",
    }
    lines = good[:50] + [b.encode() for b in bad] + good[50:]
    bad_line_numbers = {51 + i: code for i, code in enumerate(bad.values())}

    created = await submit(batches, lines, metadata={"suite": "test"})
    assert created["status"] == "in_progress" and created["request_counts"]["total"] == len(lines)
    assert created["metadata"] == {"suite": "test"}

    # interactive chat keeps working (and is served first) while the batch runs
    answer = await openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Interactive during a batch?"}], max_tokens=4
    )
    during = await batches.get(created["id"])
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert during["status"] == "in_progress", "the interactive turn should not have waited for the whole batch"

    batch = await batches.wait(created["id"], timeout_s=240)
    assert batch["status"] == "completed"
    counts = batch["request_counts"]
    assert counts == {"total": len(lines), "completed": len(good), "failed": len(bad)}

    output = jsonl(await batches.read(batch["output_file_id"]))
    assert sorted(o["custom_id"] for o in output) == sorted(orjson.loads(g)["custom_id"] for g in good)
    by_id = {o["custom_id"]: o for o in output}
    for o in output:
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"] == o["id"] == o["response"]["request_id"]
    assert by_id["blocked"]["response"]["body"]["choices"][0]["finish_reason"] == "content_filter"
    assert by_id["req-7"]["response"]["body"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert by_id["req-7"]["response"]["body"]["usage"]["completion_tokens"] <= 4

    errors = jsonl(await batches.read(batch["error_file_id"]))
    assert {e["error"]["line"]: e["error"]["code"] for e in errors} == bad_line_numbers
    for e in errors:
        assert e["response"] is None and e["error"]["message"].startswith(f"line {e['error']['line']}: ")
    assert [e["error"]["line"] for e in errors] == sorted(bad_line_numbers)  # in input order


async def test_resubmitting_with_the_same_batch_key_runs_nothing_twice(batches: BatchService, settings: Settings) -> None:
    lines = [line(f"idem-{i}", f"idempotent {i}") for i in range(5)]
    first = await submit(batches, lines, batch_key="nightly-2026-11-21")
    published = await end_offsets(settings, "batch.requests")
    again = await submit(batches, lines, batch_key="nightly-2026-11-21")
    assert again["id"] == first["id"]
    assert await end_offsets(settings, "batch.requests") == published  # nothing published the second time
    with pytest.raises(Exception, match="different input file"):
        await submit(batches, lines[:3], batch_key="nightly-2026-11-21")
    done = await batches.wait(first["id"], timeout_s=120)
    assert done["request_counts"] == {"total": 5, "completed": 5, "failed": 0}


async def test_cancel_mid_batch_stops_new_work_and_keeps_partial_results(batches: BatchService, settings: Settings) -> None:
    lines = [line(f"c-{i}", f"A long answer please, number {i}.", max_tokens=48, temperature=1.0) for i in range(200)]
    produced = sum((await end_offsets(settings, "batch.results")).values())
    created = await submit(batches, lines)
    bid = created["id"]

    async def some_generated() -> bool:  # on the topic: the batch store may lag behind the bus
        return sum((await end_offsets(settings, "batch.results")).values()) >= produced + 3

    await eventually(some_generated, timeout_s=120, what="a few batch lines generated")
    cancelling = await batches.cancel(bid)
    assert cancelling["status"] in ("cancelling", "cancelled"), cancelling
    results = [e for e in await read_topic(settings, "batch.results") if isinstance(e, TurnCompleted) and e.batch and e.batch.batch_id == bid]
    at_cancel = len({e.batch.custom_id for e in results if e.batch and e.finish_reason != "cancelled"})
    batch = await batches.wait(bid, timeout_s=180)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None, batch
    completed = batch["request_counts"]["completed"]
    # only turns already running in the inference worker (or on their way to it) may still finish normally
    assert at_cancel <= completed <= at_cancel + settings.max_inflight_turns + 2, (at_cancel, batch)
    assert completed + batch["request_counts"]["failed"] == len(lines), batch
    assert batch["cancelled_count"] == len(lines) - completed, batch
    output = jsonl(await batches.read(batch["output_file_id"]))
    errors = jsonl(await batches.read(batch["error_file_id"]))
    assert len(output) == completed and len(errors) == len(lines) - completed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert {o["custom_id"] for o in output}.isdisjoint(e["custom_id"] for e in errors)


async def test_inference_restart_mid_batch_loses_and_duplicates_nothing(batches: BatchService, settings: Settings, stack: Stack) -> None:
    lines = [line(f"r-{i}", f"Restart-proof question {i}", max_tokens=24) for i in range(60)]
    produced = sum((await end_offsets(settings, "batch.results")).values())
    created = await submit(batches, lines)
    bid = created["id"]

    async def started() -> bool:
        return sum((await end_offsets(settings, "batch.results")).values()) >= produced + 2

    await eventually(started, timeout_s=120, what="the batch under way")
    await asyncio.to_thread(stack.kill, "inference")
    await asyncio.to_thread(stack.start_worker, "inference")
    batch = await batches.wait(bid, timeout_s=240)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == len(lines)
    output = jsonl(await batches.read(batch["output_file_id"]))
    assert sorted(o["custom_id"] for o in output) == sorted(f"r-{i}" for i in range(60))  # each exactly once
    await asyncio.to_thread(stack.wait_ready)  # interactive turns get a 503 until the inference group has a member
    results = [e for e in await read_topic(settings, "batch.results") if isinstance(e, TurnCompleted) and e.batch and e.batch.batch_id == bid]
    assert {e.batch.custom_id for e in results if e.batch} == {f"r-{i}" for i in range(60)}


async def test_batch_store_is_rebuilt_from_the_topics(batches: BatchService, settings: Settings) -> None:
    from batches.rebuild import rebuild

    created = await submit(batches, [line(f"rb-{i}", f"rebuild {i}") for i in range(6)] + [b"{oops"])
    done = await batches.wait(created["id"], timeout_s=120)
    before = await batches.read(done["output_file_id"]), await batches.read(done["error_file_id"])
    await batches.store.batches.delete_one({"_id": created["id"]})
    await batches.store.requests.delete_many({"batch_id": created["id"]})
    with pytest.raises(Exception, match="No such Batch"):
        await batches.get(created["id"])
    assert await rebuild(settings) > 0
    rebuilt = await batches.get(created["id"])
    assert rebuilt["status"] == "completed" and rebuilt["request_counts"] == done["request_counts"]
    assert (await batches.read(rebuilt["output_file_id"]), await batches.read(rebuilt["error_file_id"])) == before


async def test_openai_client_files_and_batches_against_the_edge(edge_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0)
    data = b"\n".join(line(f"oa-{i}", f"openai client {i}") for i in range(8)) + b"\n" + b"not json\n"
    uploaded = await client.files.create(file=("prompts.jsonl", io.BytesIO(data)), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    assert (await client.files.retrieve(uploaded.id)).filename == "prompts.jsonl"
    assert (await client.files.content(uploaded.id)).content == data
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"via": "openai"})
    assert batch.status == "in_progress" and batch.request_counts is not None and batch.request_counts.total == 9

    async def finished() -> Any:
        b = await client.batches.retrieve(batch.id)
        return b if b.status == "completed" else None

    done = await eventually(finished, timeout_s=120, what="the batch completed")
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (8, 1)
    assert done.output_file_id and done.error_file_id
    output = jsonl((await client.files.content(done.output_file_id)).content)
    assert sorted(o["custom_id"] for o in output) == sorted(f"oa-{i}" for i in range(8))
    errors = jsonl((await client.files.content(done.error_file_id)).content)
    assert [e["error"]["line"] for e in errors] == [9]
    assert any(b.id == batch.id for b in (await client.batches.list(limit=50)).data)
    cancelled = await client.batches.cancel(batch.id)  # already completed: unchanged
    assert cancelled.status == "completed"


async def test_batch_http_errors_are_openai_style(edge_url: str) -> None:
    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:
        r = await http.get("/v1/batches/batch_nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "batch_not_found"
        r = await http.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
        r = await http.post("/v1/batches", json={"endpoint": "/v1/chat/completions"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
        r = await http.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "fine-tune"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
        r = await http.post("/v1/files", json={"purpose": "batch"})
        assert r.status_code == 400
        uploaded = (await http.post("/v1/files", files={"file": ("x.jsonl", line("x", "hi"))}, data={"purpose": "batch"})).json()
        r = await http.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "endpoint"
        r = await http.get("/v1/files/file-nope/content")
        assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


async def test_collector_keeps_a_completion_and_fails_a_keyless_dead_letter(batches: BatchService, settings: Settings) -> None:
    """Redelivery after a completion cannot downgrade it; a dead letter without correlation id still ends its line."""
    from batches.collector import BatchCollector
    from batches.store import request_id
    from schemas.events import BatchCreated, BatchRef, DeadLetter

    collector = BatchCollector(settings, batches.store)
    bid = "batch_0000feedfacecafe"
    await batches.store.batches.delete_many({"_id": bid})
    await batches.store.requests.delete_many({"batch_id": bid})
    await collector.apply(BatchCreated(batch_id=bid, input_file_id="file-x", input_sha256="0" * 64, total=2, valid=2))
    refs = [BatchRef(batch_id=bid, custom_id=f"k-{n}", line=n) for n in (1, 2)]
    done = TurnCompleted(
        correlation_id=request_id(bid, 1), conversation_id=request_id(bid, 1), attempt="a", seq=0, finish_reason="stop", text="hi", model=MODEL, batch=refs[0]
    )
    await collector.apply(done)
    await collector.apply(done)  # replayed: counted once
    await collector.apply(done.model_copy(update={"finish_reason": "cancelled", "attempt": "b"}))  # a late redelivery
    letter = DeadLetter(source_topic="batch.screened", partition=0, offset=1, key=request_id(bid, 2), value="{oops", worker="retrieval", reason="not JSON")
    await collector.apply(letter)
    assert await batches.store.maybe_finalize(bid) == "completed"
    batch = await batches.get(bid)
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    output = jsonl(await batches.read(batch["output_file_id"]))
    assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in output] == ["hi"]
    errors = jsonl(await batches.read(batch["error_file_id"]))
    assert [e["error"]["code"] for e in errors] == ["dead_lettered"]


async def test_downstream_gate_holds_the_batch_lane_while_the_next_stage_is_behind(settings: Settings, stack: Stack) -> None:
    """The gate closes above ``high`` uncommitted records of the downstream group and reopens below ``low``."""
    from aiokafka import TopicPartition
    from aiokafka.admin import NewTopic

    from consumers.gate import DownstreamGate
    from topics.clients import make_admin, make_consumer, make_producer

    name, group = "gate.test", "gate-test-group"
    admin = make_admin(settings)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            await admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(name, b"x", key=str(i).encode())
    finally:
        await producer.stop()
    gate = DownstreamGate(settings, name, group, high=16, low=4, every_s=0.1)
    await gate.start()
    try:
        await eventually(lambda: asyncio.sleep(0, result=not gate.open), timeout_s=10, what="the gate to close")
        assert gate.backlog >= 20
        follower = make_consumer(settings, name, group_id=group)
        await follower.start()
        try:
            tp = TopicPartition(name, 0)
            await eventually(lambda: follower.getmany(timeout_ms=200), timeout_s=20, what="the follower assigned")
            end = (await follower.end_offsets([tp]))[tp]
            await follower.commit({tp: end - 10})  # the downstream stage caught up to 10 behind: still held
            await asyncio.sleep(0.5)
            assert not gate.open
            await follower.commit({tp: end - 2})  # below low: open again
            await eventually(lambda: asyncio.sleep(0, result=gate.open), timeout_s=10, what="the gate to reopen")
        finally:
            await follower.stop()
    finally:
        await gate.stop()
