"""Per-stage latency and Prometheus metrics on the real stack: the edge's /metrics, each worker's, /live.json."""

from __future__ import annotations

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbus.stack import Stack
from core.config import Settings
from schemas.timing import breakdown, server_timing

pytestmark = pytest.mark.stack


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


async def streamed_turn(http: httpx.AsyncClient, edge_url: str, question: str) -> dict:
    """One streamed turn; returns the finish chunk (which carries ``timing``)."""
    finish = None
    body = {"model": "chatbus-tiny-random", "messages": [{"role": "user", "content": question}], "max_tokens": 12, "stream": True, "temperature": 0}
    async with http.stream("POST", f"{edge_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    finish = chunk
    assert finish is not None
    return finish


async def test_each_turn_reports_its_split_into_stages_and_hops(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        finish = await streamed_turn(http, edge_url, "How do I define a function in Python?")
        timing = finish["timing"]
        assert set(timing["stages"]) >= {"edge", "safety", "retrieval", "queue", "prefill"}
        assert set(timing["hops"]) == {"edge→safety", "safety→retrieval", "retrieval→inference", "inference→edge"}
        # the split is exact: TTFT = the edge's work + every stage before the first token + every hop
        parts = sum(timing["stages"][s] for s in ("edge", "safety", "retrieval", "queue", "prefill")) + sum(timing["hops"].values())
        assert timing["totals"]["ttft"] == pytest.approx(parts, abs=0.1)
        worker = timing["stages"]["queue"] + timing["stages"]["prefill"]
        assert timing["totals"]["bus_overhead"] == pytest.approx(timing["totals"]["ttft"] - worker, abs=0.05)
        assert all(v >= 0 for v in timing["stages"].values())

        plain = await http.post(
            f"{edge_url}/v1/chat/completions",
            json={"model": "chatbus-tiny-random", "messages": [{"role": "user", "content": "What is a list?"}], "max_tokens": 4},
        )
        assert plain.status_code == 200
        header = plain.headers["server-timing"]  # W3C Server-Timing, shown by browsers' dev tools
        assert "safety;dur=" in header and "edge-to-safety;dur=" in header and "ttft;dur=" in header
        assert plain.json()["timing"]["totals"]["e2e"] >= plain.json()["timing"]["totals"]["ttft"]


async def test_edge_and_workers_export_prometheus_metrics(edge_url: str, stack: Stack, settings: Settings) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await streamed_turn(http, edge_url, "What does the with statement do?")
        edge = samples((await http.get(f"{edge_url}/metrics")).text)
        assert total(edge, "chatbus:time_to_first_token_seconds_count") >= 1
        assert total(edge, "chatbus:e2e_request_latency_seconds_count") >= 1
        assert total(edge, "chatbus:inter_token_latency_seconds_count") >= 1
        for hop in ("edge→safety", "safety→retrieval", "retrieval→inference", "inference→edge"):
            assert total(edge, "chatbus:turn_hop_seconds_count", hop=hop) >= 1, hop
        for stage in ("safety", "retrieval", "prefill", "decode"):
            assert total(edge, "chatbus:turn_stage_seconds_count", stage=stage) >= 1, stage
        assert (
            total(edge, "chatbus:request_success_total", finished_reason="stop") + total(edge, "chatbus:request_success_total", finished_reason="length") >= 1
        )
        lag_groups = {dict(ls)["group"] for (n, ls) in edge if n == "chatbus:consumer_lag"}
        assert {"chatbus-safety", "chatbus-retrieval", "chatbus-inference", "chatbus-recorder"} <= lag_groups

        def worker(kind: str) -> str:
            return f"http://127.0.0.1:{stack.metrics_port(kind)}/metrics"

        safety = samples((await http.get(worker("safety"))).text)
        assert total(safety, "chatbus:safety_verdicts_total", action="allow") >= 1
        assert total(safety, "chatbus:embedding_seconds_count") >= 1
        assert total(safety, "chatbus:stage_seconds_count", stage="safety", lane="interactive") >= 1
        retrieval = samples((await http.get(worker("retrieval"))).text)
        assert total(retrieval, "chatbus:retrieval_latency_seconds_count") >= 1
        assert total(retrieval, "chatbus:retrieval_hits_count") >= 1
        inference = samples((await http.get(worker("inference"))).text)
        assert total(inference, "chatbus:generation_tokens_total") >= 1
        assert total(inference, "chatbus:prompt_tokens_total") >= 1
        assert total(inference, "chatbus:engine_time_to_first_token_seconds_count") >= 1
        assert ("chatbus:num_requests_running", (("lane", "interactive"),)) in inference
        recorder = samples((await http.get(worker("recorder"))).text)
        assert total(recorder, "chatbus:stage_records_total", stage="recorder") >= 1


async def test_live_data_has_series_breakdown_and_lag(edge_url: str) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        await streamed_turn(http, edge_url, "How are exceptions handled?")
        live = (await http.get(f"{edge_url}/live.json")).json()
        assert live["series"] and live["series"][-1]["outcomes"]
        names = {(b["kind"], b["name"]) for b in live["breakdown"]}
        assert {("stage", "safety"), ("hop", "edge→safety"), ("total", "ttft")} <= names
        assert "chatbus-inference" in live["lag"]
        page = await http.get(f"{edge_url}/live")
        assert page.status_code == 200 and "uPlot" in page.text
        assert (await http.get(f"{edge_url}/static/vendor/uplot/uPlot.iife.min.js")).status_code == 200


def test_breakdown_of_marks() -> None:
    marks = {
        "edge_received": 0.0,
        "edge_published": 0.001,
        "safety_start": 0.004,
        "safety_end": 0.014,
        "retrieval_start": 0.016,
        "retrieval_end": 0.020,
        "inference_dequeued": 0.023,
        "first_token": 0.040,
        "last_token": 0.2,
        "first_relayed": 0.043,
    }
    parts = breakdown(marks)
    assert parts["hops"]["edge→safety"] == pytest.approx(0.003)
    assert parts["stages"]["prefill"] == pytest.approx(0.017)
    assert parts["totals"]["ttft"] == pytest.approx(0.043)
    assert parts["totals"]["hops"] == pytest.approx(0.003 + 0.002 + 0.003)
    assert parts["totals"]["bus_overhead"] == pytest.approx(0.043 - 0.017)
    assert "e2e" not in parts["totals"]  # no last_relayed mark: not reported, not guessed
    assert server_timing(parts).startswith("edge;dur=1.0, safety;dur=10.0")
    scheduled = breakdown({**marks, "inference_scheduled": 0.030})  # 7 ms waiting for a generation slot
    assert scheduled["stages"]["queue"] == pytest.approx(0.007) and scheduled["stages"]["prefill"] == pytest.approx(0.010)
    assert scheduled["totals"]["bus_overhead"] == pytest.approx(0.043 - 0.017)  # the worker's queue is not the bus's
