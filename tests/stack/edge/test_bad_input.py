"""Bad input at the edge: every answer is OpenAI's error JSON with the right status, at once — a resume id
for an unknown turn, ids with impossible times, non-ASCII digits, metadata keys the database would
misread, unknown routes and methods, broken multipart bodies, JSON sent as another type, and a
cross-origin preflight."""

from __future__ import annotations

import time
import uuid

import httpx
import orjson
import pytest

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"


def openai_error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert isinstance(error, dict) and error["message"] and "type" in error
    return error


async def test_a_resume_id_for_an_unknown_turn_is_a_404_at_once(edge_url: str) -> None:
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    now_ms = int(time.time() * 1000)
    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:
        started = time.monotonic()
        r = await http.get(f"/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": f"{cid}:0:{now_ms - 1000}:0"})
        assert openai_error(r, 404)["param"] == "completion_id"
        assert time.monotonic() - started < 10  # the lookup is bounded (FIND_TIMEOUT_S), not turn_timeout_s
        for since_ms in (-1, 2**63 + 5, now_ms + 3_600_000):
            r = await http.get(f"/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": f"{cid}:0:{since_ms}:0"})
            assert openai_error(r, 400)["param"] == "Last-Event-ID"
        r = await http.get(f"/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": f"{cid}:0:{now_ms}:{2**63}"})
        openai_error(r, 400)


async def test_a_turn_streamed_by_this_edge_still_resumes(edge_url: str) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Say something short."}], "max_tokens": 8}
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=edge_url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    ids.append(line[3:].strip())
        cid = ids[0].split(":")[0]
        async with http.stream("GET", f"/v1/chat/completions/{cid}/events", headers={"Last-Event-ID": ids[0]}) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        assert "data: [DONE]" in lines


async def test_non_ascii_digits_and_database_unsafe_metadata_are_400s(edge_url: str) -> None:
    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:
        for path in ("/v1/conversations", "/v1/batches"):
            assert openai_error(await http.get(path, params={"limit": "²"}), 400)["param"] == "limit"
        line = (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "%s", "messages": [{"role": "user", "content": "hi"}]}}\n'
            % MODEL.encode()
        )
        uploaded = (await http.post("/v1/files", files={"file": ("x.jsonl", line)}, data={"purpose": "batch"})).json()
        for key in ("$where", "a.b"):
            request = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {key: "x"}}
            assert openai_error(await http.post("/v1/batches", json=request), 400)["param"] == "metadata"


async def test_routing_multipart_and_media_type_errors_are_openai_json(edge_url: str) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as http:
        assert "Invalid URL" in str(openai_error(await http.post("/v1/nothing-here", json={}), 404)["message"])
        r = await http.delete("/v1/chat/completions")
        openai_error(r, 405)
        assert "POST" in r.headers["allow"]
        broken = b'--XYZ\r\nContent-Disposition: form-data; name="file"\r\n'  # no end, no closing boundary
        openai_error(await http.post("/v1/files", content=broken, headers={"content-type": "multipart/form-data; boundary=XYZ"}), 400)
        for media in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": media} if media else {}
            r = await http.post("/v1/chat/completions", content=orjson.dumps(chat), headers=headers)
            assert openai_error(r, 415)["message"]
        # another origin's preflight is refused (no Access-Control-Allow-Origin), in JSON
        r = await http.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
        )
        openai_error(r, 400)
        assert "access-control-allow-origin" not in r.headers
        # and the same request with the right type goes through
        r = await http.post("/v1/chat/completions", json={**chat, "max_tokens": 4}, timeout=90)
        assert r.status_code == 200, r.text
