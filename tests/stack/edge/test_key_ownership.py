"""Keys own their data: on an edge with API keys, a key sees, continues, stops, resumes and rates only its
own conversations and turns (another key's are a 404, as if they did not exist); the operator surfaces
need an operator key; a key is stored only as its hash; ``GET /v1/usage`` shows a key its own tokens and
cost, and an operator every key's."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from chatbus.stack import Stack
from edge.auth import key_owner
from tests.conftest import edge_process, eventually

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-9876543210", "ops-key-5555"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_key_sees_and_acts_on_only_its_own_turns(stack: Stack, mongo: Any) -> None:
    with edge_process(stack, 3, api_keys=f"{ALICE},{BOB}", operator_keys=OPS) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=90) as http:
            ids: list[str] = []
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Tell me about rivers."}], "max_tokens": 12}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth(ALICE)) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("id:"):
                        ids.append(line[3:].strip())
            cid = ids[-1].split(":")[0]
            turn = await eventually(lambda: mongo.turns.find_one({"_id": cid, "answer": {"$exists": True}}), 60, "alice's turn recorded")
            conv = turn["conversation_id"]
            assert turn["owner"] == key_owner(ALICE) and ALICE not in orjson.dumps(turn, default=str).decode()

            async def alice_lists() -> bool:
                r = await http.get("/v1/conversations", headers=auth(ALICE))
                return any(c["id"] == conv for c in r.json()["data"])

            await eventually(alice_lists, 30, "alice's conversation in her list")
            assert not any(c["id"] == conv for c in (await http.get("/v1/conversations", headers=auth(BOB))).json()["data"])
            assert (await http.get(f"/v1/conversations/{conv}", headers=auth(ALICE))).status_code == 200
            assert (await http.get(f"/v1/conversations/{conv}", headers=auth(BOB))).status_code == 404
            assert (await http.post(f"/v1/chat/completions/{cid}/cancel", headers=auth(BOB))).status_code == 404
            assert (await http.post(f"/v1/chat/completions/{cid}/cancel", headers=auth(ALICE))).json()["cancelled"] is False  # finished
            resume = await http.get(f"/v1/chat/completions/{cid}/events", headers={**auth(BOB), "Last-Event-ID": ids[0]})
            assert resume.status_code == 404
            vote = {"type": "rating", "response_id": cid, "rating": "up"}
            assert (await http.post("/v1/feedback", json=vote, headers=auth(BOB))).status_code == 404
            assert (await http.post("/v1/feedback", json=vote, headers=auth(ALICE))).status_code == 200
            embed = {"model": "all-MiniLM-L6-v2", "input": "rivers"}
            assert (await http.post("/v1/embeddings", json=embed)).status_code == 401  # embeddings need a key too
            assert len((await http.post("/v1/embeddings", json=embed, headers=auth(BOB))).json()["data"][0]["embedding"]) == 384
            follow = {"model": MODEL, "messages": [{"role": "user", "content": "And lakes?"}], "max_tokens": 4, "conversation_id": conv}
            assert (await http.post("/v1/chat/completions", json=follow, headers=auth(BOB))).status_code == 404  # not bob's to continue

            # files and batches
            line = {
                "custom_id": "a",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            }
            up = await http.post("/v1/files", files={"file": ("in.jsonl", orjson.dumps(line) + b"\n")}, data={"purpose": "batch"}, headers=auth(ALICE))
            file_id = up.json()["id"]
            assert (await http.get(f"/v1/files/{file_id}", headers=auth(BOB))).status_code == 404
            assert (await http.get(f"/v1/files/{file_id}/content", headers=auth(BOB))).status_code == 404
            request = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
            assert (await http.post("/v1/batches", json=request, headers=auth(BOB))).status_code == 404  # not bob's file
            batch = (await http.post("/v1/batches", json=request, headers=auth(ALICE))).json()
            assert (await http.get(f"/v1/batches/{batch['id']}", headers=auth(BOB))).status_code == 404
            assert (await http.post(f"/v1/batches/{batch['id']}/cancel", headers=auth(BOB))).status_code == 404
            assert not any(b["id"] == batch["id"] for b in (await http.get("/v1/batches", headers=auth(BOB))).json()["data"])
            assert any(b["id"] == batch["id"] for b in (await http.get("/v1/batches", headers=auth(ALICE))).json()["data"])

            # operator surfaces
            for path in ("/metrics", "/live.json", "/dashboard.json"):
                assert (await http.get(path, headers=auth(ALICE))).status_code == 401, path
                assert (await http.get(path, headers=auth(OPS))).status_code == 200, path
            assert set((await http.get("/readyz", headers=auth(ALICE))).json()) == {"ready"}
            assert "admitting" in (await http.get("/readyz", headers=auth(OPS))).json()


async def test_usage_is_per_key_and_priced(stack: Stack, mongo: Any) -> None:
    price = stack.settings.prices[MODEL]
    with edge_process(stack, 3, api_keys=f"{ALICE},{BOB}", operator_keys=OPS) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=90) as http:
            sent: dict[str, list[dict[str, int]]] = {ALICE: [], BOB: []}
            for key, n in ((ALICE, 2), (BOB, 1)):
                for i in range(n):
                    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 6}
                    r = await http.post("/v1/chat/completions", json=body, headers=auth(key))
                    assert r.status_code == 200, r.text
                    priced = {"_id": r.json()["id"], "answer.cost_usd": {"$gt": 0}}
                    await eventually(lambda q=priced: mongo.turns.find_one(q), 60, "turn priced")
                    sent[key].append(r.json()["usage"])

            def totals(page: dict[str, Any], key: str) -> tuple[int, int, int, float]:
                rows = [r for b in page["data"] for r in b["results"] if r["api_key_id"] == key_owner(key)]
                return (
                    sum(r["input_tokens"] for r in rows),
                    sum(r["output_tokens"] for r in rows),
                    sum(r["num_model_requests"] for r in rows),
                    sum(r["cost_usd"] for r in rows),
                )

            mine = (await http.get("/v1/usage", params={"group_by": "model,api_key_id"}, headers=auth(ALICE))).json()
            assert mine["object"] == "page" and len(mine["data"]) == 7 and all(b["object"] == "bucket" for b in mine["data"])
            keys = {r["api_key_id"] for b in mine["data"] for r in b["results"]}
            assert keys == {key_owner(ALICE)}  # only her own key, though bob used the same edge
            assert {r["model"] for b in mine["data"] for r in b["results"]} == {MODEL}
            everyone = (await http.get("/v1/usage", params=[("group_by[]", "api_key_id")], headers=auth(OPS))).json()
            for key in (ALICE, BOB):
                prompt = sum(u["prompt_tokens"] for u in sent[key])
                completion = sum(u["completion_tokens"] for u in sent[key])
                got = totals(everyone, key)
                # at least what these turns used (the other test in this module sends more with the same keys)
                assert got[0] >= prompt and got[1] >= completion and got[2] >= len(sent[key])
                assert abs(got[3] - (got[0] * price.prompt + got[1] * price.completion) / 1e6) < 1e-9
            assert totals(mine, ALICE) == totals(everyone, ALICE)
            assert (await http.get("/v1/usage", params={"group_by": "colour"}, headers=auth(ALICE))).status_code == 400
            assert (await http.get("/v1/usage", params={"start_time": "100", "end_time": "99999999"}, headers=auth(ALICE))).status_code == 400
            assert (await http.get("/v1/usage")).status_code == 401
