"""Keys kept in the database (``CHATBUS_KEY_STORE``, ``chatbus keys``) on two edges: a key's requests per minute
hold across both (the 429 carries OpenAI's ``x-ratelimit-*`` headers and nothing is published), a model the
key may not use is a 403, a revoked key stops working on both edges at its next request, and tokens per
minute and token budgets, charged from the answers' usage, refuse the next request on the other edge."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from chatbus.stack import Stack
from core.config import ROOT
from tests.conftest import edge_process, eventually

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


def chatbus(stack: Stack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "chatbus.cli", "keys", *args], env=stack.env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_limits_and_revocation_hold_on_every_edge(stack: Stack, mongo: Any) -> None:
    created = json.loads(chatbus(stack, "create", "--tenant", "acme", "--name", "ci", "--rpm", "3", "--models", MODEL, "--json"))
    key, key_id = created["key"], created["id"]
    assert key.startswith("cb-") and key_id.startswith("key-") and key not in chatbus(stack, "list")
    auth = {"Authorization": f"Bearer {key}"}
    with ExitStack() as edges:
        urls = [edges.enter_context(edge_process(stack, p, key_store="true"))[0] for p in (4, 5)]
        async with httpx.AsyncClient(timeout=90) as http:
            assert (await http.get(f"{urls[0]}/v1/conversations")).status_code == 401  # the store needs a key
            if time.time() % 60 > 40:  # the three requests below must fall in one one-minute window
                await asyncio.sleep(61 - time.time() % 60)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
            for i in range(3):  # alternate edges: the count is shared through the database
                r = await http.post(f"{urls[i % 2]}/v1/chat/completions", json=body, headers=auth)
                assert r.status_code == 200, r.text
                assert r.headers["x-ratelimit-limit-requests"] == "3" and r.headers["x-ratelimit-remaining-requests"] == str(2 - i)
            refused = await http.post(f"{urls[1]}/v1/chat/completions", json=body, headers=auth)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(refused.headers["Retry-After"]) <= 60 and refused.headers["x-ratelimit-remaining-requests"] == "0"
            assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
            other = await http.post(f"{urls[0]}/v1/chat/completions", json={**body, "model": "qwen2.5-coder-0.5b-instruct"}, headers=auth)
            assert other.status_code == 403 and other.json()["error"]["code"] == "model_not_allowed"

            async def three_recorded() -> bool:
                return await mongo.turns.count_documents({"owner": key_id, "answer": {"$exists": True}}) == 3

            await eventually(three_recorded, 60, "the three turns recorded")
            await asyncio.sleep(1.0)
            assert await mongo.turns.count_documents({"owner": key_id}) == 3  # the refused ones were never published

            assert "revoked" in chatbus(stack, "revoke", key_id)
            for url in urls:  # at once, on both edges
                r = await http.get(f"{url}/v1/conversations", headers=auth)
                assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    listed = [json.loads(line) for line in chatbus(stack, "list", "--tenant", "acme", "--json").splitlines()]
    assert [(k["id"], k["revoked_at"] is not None) for k in listed] == [(key_id, True)]
    assert MODEL in chatbus(stack, "usage", key_id)


async def test_tokens_per_minute_and_budgets_hold_on_every_edge(stack: Stack, mongo: Any) -> None:
    """Each finished turn's tokens are charged to its key (the minute's window, the day's and month's budget);
    once what was charged reaches a limit, the next request on any edge is a 429, before anything is published."""
    by_tpm = json.loads(chatbus(stack, "create", "--tenant", "acme", "--tpm", "1", "--json"))
    by_budget = json.loads(chatbus(stack, "create", "--tenant", "acme", "--budget-tokens", "1", "--budget-period", "day", "--json"))
    listed = chatbus(stack, "list", "--tenant", "acme")
    assert "tpm 1 " in listed and "budget 1/day" in listed
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    with ExitStack() as edges:
        urls = [edges.enter_context(edge_process(stack, p, key_store="true"))[0] for p in (6, 7)]
        async with httpx.AsyncClient(timeout=90) as http:
            if time.time() % 60 > 40:  # the tokens-per-minute turn and its refusal must fall in one window
                await asyncio.sleep(61 - time.time() % 60)
            for created in (by_tpm, by_budget):
                auth = {"Authorization": f"Bearer {created['key']}"}
                first = await http.post(f"{urls[0]}/v1/chat/completions", json=body, headers=auth)
                assert first.status_code == 200, first.text
                tokens = first.json()["usage"]["total_tokens"]
                assert tokens > 0

                async def charged(key_id: str = created["id"]) -> bool:  # the day's budget, then the month's: both written
                    docs = [await mongo.key_budgets.find_one({"key": key_id, "_id": {"$regex": p}}) for p in (r":\d{4}-\d{2}-\d{2}$", r":\d{4}-\d{2}$")]
                    return all(d is not None and d["tokens"] > 0 for d in docs)

                await eventually(charged, 30, "the turn's tokens charged to its key")
                day = await mongo.key_budgets.find_one({"key": created["id"], "_id": {"$regex": r":\d{4}-\d{2}-\d{2}$"}})
                month = await mongo.key_budgets.find_one({"key": created["id"], "_id": {"$regex": r":\d{4}-\d{2}$"}})
                assert day["tokens"] == month["tokens"] == tokens  # exactly the answer's usage
                before = await mongo.turns.count_documents({"owner": created["id"]})
                refused = await http.post(f"{urls[1]}/v1/chat/completions", json=body, headers=auth)  # the other edge
                assert refused.status_code == 429, refused.text
                assert int(refused.headers["Retry-After"]) >= 1
                if created is by_tpm:
                    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "tokens" in refused.json()["error"]["message"]
                    assert refused.headers["x-ratelimit-limit-tokens"] == "1" and refused.headers["x-ratelimit-remaining-tokens"] == "0"
                else:
                    err = refused.json()["error"]
                    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota" and "budget of 1 tokens" in err["message"]
                    assert int(refused.headers["Retry-After"]) <= 86400
                await asyncio.sleep(1.0)
                assert await mongo.turns.count_documents({"owner": created["id"]}) == before  # nothing published for the 429


async def test_a_keys_concurrent_requests_are_capped_across_edges(stack: Stack, mongo: Any) -> None:
    """``--max-parallel 1``: while one streamed answer runs, the key's next request on the other edge is a 429;
    once it ends (its lease given back), the key is served again."""
    created = json.loads(chatbus(stack, "create", "--tenant", "acme", "--max-parallel", "1", "--json"))
    auth = {"Authorization": f"Bearer {created['key']}"}
    long = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1500}
    short = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    with ExitStack() as edges:
        urls = [edges.enter_context(edge_process(stack, p, key_store="true"))[0] for p in (4, 5)]
        async with httpx.AsyncClient(timeout=90) as http:
            async with http.stream("POST", f"{urls[0]}/v1/chat/completions", json=long, headers=auth) as streamed:
                assert streamed.status_code == 200
                lines = streamed.aiter_lines()
                async for line in lines:  # the answer has begun: its lease is held
                    if line.startswith("data:") and '"content"' in line:
                        break
                refused = await http.post(f"{urls[1]}/v1/chat/completions", json=short, headers=auth)
                assert refused.status_code == 429, refused.text
                err = refused.json()["error"]
                assert err["code"] == "rate_limit_exceeded" and "1 at once" in err["message"] and refused.headers["Retry-After"] == "1"
                async for _ in lines:  # read it to its end
                    pass

            async def free() -> bool:
                return await mongo.key_leases.count_documents({"key": created["id"]}) == 0

            await eventually(free, 30, "the stream's lease given back")
            again = await http.post(f"{urls[1]}/v1/chat/completions", json=short, headers=auth)
            assert again.status_code == 200, again.text
            await eventually(free, 30, "the non-streamed answer's lease given back")


async def test_a_keys_batches_are_charged_to_its_budget(stack: Stack, mongo: Any) -> None:
    """A batch sent with a stored key: a line naming a model the key may not use is an invalid line, each
    completed line's tokens are charged to the key's day and month budgets by the ``batches`` worker (not to
    its tokens per minute), and once the budget is spent the next batch is a 429 ``insufficient_quota``."""
    created = json.loads(chatbus(stack, "create", "--tenant", "acme", "--budget-tokens", "1", "--budget-period", "day", "--models", MODEL, "--json"))
    key_id = created["id"]
    auth = {"Authorization": f"Bearer {created['key']}"}

    def line(custom_id: str, model: str = MODEL) -> bytes:
        body = {"model": model, "messages": [{"role": "user", "content": f"Name a colour ({custom_id})."}], "max_tokens": 4}
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).encode()

    data = b"\n".join([line("a"), line("b"), line("other", "chatbus-tiny-small")])
    with edge_process(stack, 6, key_store="true") as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=90, headers=auth) as http:
            uploaded = (await http.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"})).json()
            batch = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            r = await http.post("/v1/batches", json=batch)
            assert r.status_code == 200, r.text
            batch_id = r.json()["id"]

            async def ended() -> bool:
                return (await http.get(f"/v1/batches/{batch_id}")).json()["status"] in ("completed", "failed", "expired", "cancelled")

            await eventually(ended, 120, "the batch ended")
            done = (await http.get(f"/v1/batches/{batch_id}")).json()
            assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}, done
            errors = [json.loads(x) for x in (await http.get(f"/v1/files/{done['error_file_id']}/content")).content.splitlines()]
            assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("other", "model_not_allowed")]
            output = [json.loads(x) for x in (await http.get(f"/v1/files/{done['output_file_id']}/content")).content.splitlines()]
            tokens = sum(o["response"]["body"]["usage"]["total_tokens"] for o in output)
            assert len(output) == 2 and tokens > 1

            async def charged() -> bool:
                docs = [await mongo.key_budgets.find_one({"key": key_id, "_id": {"$regex": p}}) for p in (r":\d{4}-\d{2}-\d{2}$", r":\d{4}-\d{2}$")]
                return all(d is not None and d["tokens"] == tokens for d in docs)

            await eventually(charged, 30, "the lines' tokens charged to the key's budgets, once each")
            assert await mongo.rate_windows.count_documents({"key": key_id}) == 0  # not to its tokens per minute
            refused = await http.post("/v1/batches", json=batch)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "insufficient_quota" and int(refused.headers["Retry-After"]) >= 1
            assert (await http.get("/v1/batches")).json()["data"][0]["id"] == batch_id  # nothing new was created
