"""Engines: the transformers engine on the tiny random model (both modes), the shared helpers, the
OpenAI-compatible engine against a local SSE server, and engine selection."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from chatbus.tiny_model import build_tiny_model
from core.config import Settings
from inference_workers.engines import make_engine
from inference_workers.engines.base import GenerationDelta, GenerationRequest, IncrementalDetokenizer, StopMatcher, fit_prompt
from inference_workers.engines.openai_engine import OpenAIEngine
from inference_workers.engines.transformers_engine import TransformersEngine

USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-model", seed=0)


@pytest.fixture(scope="module", params=["continuous_batching", "threads"])
async def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> AsyncIterator[TransformersEngine]:
    eng = TransformersEngine(str(tiny_model_dir), device="cpu", max_model_len=2048, mode=request.param)
    await eng.start()
    yield eng
    await eng.stop()


async def collect(engine: Any, req: GenerationRequest) -> list[GenerationDelta]:
    async with aclosing(engine.generate(req)) as stream:
        return [d async for d in stream]


async def wait_idle(engine: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.active_requests:
        assert time.monotonic() < deadline, f"{engine.active_requests} requests still active"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------ transformers


async def test_stream_yields_deltas_then_one_finish(engine: TransformersEngine) -> None:
    deltas = await collect(engine, GenerationRequest("t-stream", USER, max_tokens=40, temperature=1.0))
    assert len(deltas) >= 2
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length")
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and 1 <= last.completion_tokens <= 40
    if last.finish_reason == "length":
        assert last.completion_tokens == 40
    assert last.prompt_tokens == engine.count_prompt_tokens(USER) > 5
    assert "".join(d.text for d in deltas)
    await wait_idle(engine)


async def test_max_tokens_gives_length(engine: TransformersEngine) -> None:
    deltas = await collect(engine, GenerationRequest("t-len", USER, max_tokens=5, temperature=0.0))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 5


async def test_concurrent_requests_all_complete(engine: TransformersEngine) -> None:
    reqs = [GenerationRequest(f"t-conc-{i}", USER, max_tokens=12 + i, temperature=0.8, top_p=0.9) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in reqs)), 30)
    for req, deltas in zip(reqs, results, strict=True):
        assert deltas[-1].finish_reason in ("stop", "length")
        if deltas[-1].finish_reason == "length":
            assert deltas[-1].completion_tokens == req.max_tokens
    await wait_idle(engine)


async def test_cancelling_the_consumer_aborts_the_request(engine: TransformersEngine) -> None:
    first = asyncio.Event()
    received: list[GenerationDelta] = []

    async def consume() -> None:
        async for delta in engine.generate(GenerationRequest("t-cancel", USER, max_tokens=1900, temperature=1.0)):
            received.append(delta)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    assert engine.active_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine, timeout=3.0)
    assert received and received[-1].finish_reason is None
    assert received[-1].completion_tokens < 1900


async def test_aclose_aborts_the_request(engine: TransformersEngine) -> None:
    stream = engine.generate(GenerationRequest("t-aclose", USER, max_tokens=1900, temperature=1.0))
    delta = await asyncio.wait_for(anext(stream), 10)
    assert delta.finish_reason is None
    await stream.aclose()
    await wait_idle(engine, timeout=3.0)


async def test_stop_string_truncates(engine: TransformersEngine) -> None:
    base = await collect(engine, GenerationRequest("t-stop-a", USER, max_tokens=30, temperature=0.0))
    full = "".join(d.text for d in base)
    # A stop string from the middle of the greedy continuation: greedy decoding repeats it.
    candidates = (full[i : i + 3] for i in range(4, len(full) - 3))
    stop = next((c for c in candidates if "\ufffd" not in c and full.find(c) > 0), None)
    assert stop is not None, f"greedy text too short to pick a stop string: {full!r}"
    cut = full.find(stop)
    deltas = await collect(engine, GenerationRequest("t-stop-b", USER, max_tokens=30, temperature=0.0, stop=[stop]))
    text = "".join(d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    assert text == full[:cut]
    assert stop not in text
    assert deltas[-1].completion_tokens < base[-1].completion_tokens or cut < len(full) - len(stop)
    await wait_idle(engine)


async def test_long_prompt_is_truncated_to_fit(engine: TransformersEngine) -> None:
    history = [{"role": "system", "content": "SYSTEM RULES"}]
    for i in range(60):
        role = "user" if i % 2 == 0 else "assistant"
        history.append({"role": role, "content": f"message {i} " + "lorem ipsum " * 12})
    assert engine.count_prompt_tokens(history) > engine.max_model_len  # would not fit at all
    deltas = await collect(engine, GenerationRequest("t-trunc", history, max_tokens=3, temperature=0.0))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].prompt_tokens <= engine.max_model_len - 3


def long_history(n_messages: int = 256, total_chars: int = 800_000) -> list[dict[str, str]]:
    """A system message, ``n_messages - 2`` alternating turns of varied words (``total_chars`` in all; the
    newest ten are short), then a short last user message that starts with ``LAST QUESTION``."""
    rng = random.Random(0)
    words = ["kafka", "consumer", "heartbeat", "token", "the", "of", "and", "naïve", "東京", "12345", "(x);", "🙂"]
    per_message = total_chars // (n_messages - 12)
    history = [{"role": "system", "content": "SYSTEM RULES"}]
    for i in range(n_messages - 2):
        size = per_message if i < n_messages - 12 else 200
        text = " ".join(rng.choice(words) for _ in range(size // 5))
        history.append({"role": "user" if i % 2 == 0 else "assistant", "content": text[:size]})
    history.append({"role": "user", "content": "LAST QUESTION: what did the heartbeat say?"})
    return history


async def test_long_history_keeps_the_event_loop_responsive(engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    # A renderer slow enough that preparing the prompt on the event loop would stall it for seconds
    # (time.sleep releases the GIL, as the tokenizer does): the ticker shows whether it ran elsewhere.
    real_render = engine._render
    renders: list[int] = []

    def slow_render(messages: list[dict[str, Any]], tools: Any = None, prefix: str = "") -> list[int]:
        time.sleep(0.15)
        renders.append(len(messages))
        return real_render(messages, tools, prefix)

    monkeypatch.setattr(engine, "_render", slow_render)
    history = long_history()
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        deltas = await asyncio.wait_for(collect(engine, GenerationRequest("t-loop", history, max_tokens=2)), 60)
    finally:
        done.set()
        await tick
    assert len(renders) >= 3  # the slow renderer did run, for longer than the gap allowed below
    assert max(gaps) < 0.5, f"event loop stalled for {max(gaps):.2f} s"
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 2
    assert deltas[-1].prompt_tokens <= engine.max_model_len - 2
    await wait_idle(engine)


@pytest.mark.parametrize("mode", ["continuous_batching", "threads"])
async def test_stop_fails_in_flight_requests(tiny_model_dir: Path, mode: str) -> None:
    eng = TransformersEngine(str(tiny_model_dir), device="cpu", mode=mode, max_concurrency=2)
    await eng.start()
    stream = eng.generate(GenerationRequest("t-stop-engine", USER, max_tokens=1900))
    try:
        await asyncio.wait_for(anext(stream), 10)
        await eng.stop()
        with pytest.raises(RuntimeError):
            async for _ in stream:
                pass
    finally:
        await stream.aclose()
        await eng.stop()


async def test_generate_before_start_fails(tiny_model_dir: Path) -> None:
    eng = TransformersEngine(str(tiny_model_dir), device="cpu")
    with pytest.raises(RuntimeError, match="not started"):
        await collect(eng, GenerationRequest("t-nostart", USER, max_tokens=2))


# ------------------------------------------------------------------------------------------ helpers


def test_incremental_detokenizer_never_splits_characters(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    text = "naïve café — 東京タワー 🙂👍 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids] + [detok.add([tok.eos_token_id]), detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x and EN") == ("ENx and ", False)
    assert m.feed("D tail") == ("", True)
    m = StopMatcher(["stop"])
    assert m.feed("no st") == ("no ", False)
    assert m.flush() == "st"
    assert StopMatcher([]).feed("anything") == ("anything", False)
    m = StopMatcher(["bb", "abc"])
    assert m.feed("xxabcbb") == ("xx", True)  # the earliest stop string wins


def test_fit_prompt_keeps_system_and_recent_messages() -> None:
    def render(msgs: list[dict[str, str]]) -> list[int]:  # one "token" per character
        return [ord(c) for c in "".join(f"[{m['role']}]{m['content']}" for m in msgs)]

    msgs = [{"role": "system", "content": "S" * 10}] + [{"role": "user" if i % 2 == 0 else "assistant", "content": str(i) * 30} for i in range(10)]
    ids, max_new = fit_prompt(msgs, render, max_model_len=200, max_tokens=50)
    assert max_new == 50 and len(ids) <= 150
    text = "".join(map(chr, ids))
    assert text.startswith("[system]" + "S" * 10)
    assert text.endswith("9" * 30)
    # A single huge message: token-level cut right after the system prefix.
    ids, _ = fit_prompt(msgs[:1] + [{"role": "user", "content": "x" * 500}], render, 200, 50)
    assert len(ids) == 150 and "".join(map(chr, ids)).startswith("[system]")
    # max_tokens larger than the context: the prompt keeps its (short) length, max_new shrinks.
    ids, max_new = fit_prompt(msgs[:2], render, 200, 10_000)
    assert len(ids) == len(render(msgs[:2])) and len(ids) + max_new == 200


def _fit_one_by_one(messages: list[dict[str, str]], render: Any, max_model_len: int, max_tokens: int) -> tuple[list[int], int]:
    """The straightforward (quadratic) reference: drop the oldest non-system message, re-render, repeat."""
    ids = render(messages)
    max_new = max(1, min(max_tokens, max_model_len - min(len(ids), max_model_len // 2)))
    budget = max_model_len - max_new
    n_lead = 0
    while n_lead < len(messages) and messages[n_lead]["role"] in ("system", "developer"):
        n_lead += 1
    lead, rest = messages[:n_lead], messages[n_lead:]
    while len(rest) > 1 and len(ids) > budget:
        rest = rest[1:]
        ids = render(lead + rest)
    if len(ids) > budget:
        prefix = len(render(lead)) if lead else 0
        prefix = 0 if prefix >= budget else prefix
        ids = ids[:prefix] + ids[prefix + len(ids) - budget :]
    return ids, max_new


def test_fit_prompt_matches_dropping_one_message_at_a_time() -> None:
    def render(msgs: list[dict[str, str]]) -> list[int]:  # one "token" per character, with a generation prompt
        return [ord(c) for c in "".join(f"[{m['role']}]{m['content']}|" for m in msgs) + "[gen]"]

    rng = random.Random(7)
    for _ in range(3000):
        lead = [{"role": rng.choice(["system", "developer"]), "content": "S" * rng.randint(0, 60)}]
        msgs = lead[: rng.choice([0, 1, 1])] + [
            {"role": rng.choice(["user", "assistant"]), "content": "x" * rng.choice([0, 3, 20, 60, 300, 900])} for _ in range(rng.randint(0, 14))
        ]
        max_model_len = rng.choice([2, 10, 60, 200, 500, 5000])
        max_tokens = rng.choice([1, 10, 100, 10_000])
        expected = _fit_one_by_one(msgs, render, max_model_len, max_tokens)
        assert fit_prompt(msgs, render, max_model_len, max_tokens) == expected, (msgs, max_model_len, max_tokens)


def test_fit_prompt_on_a_long_history_is_fast(tiny_model_dir: Path) -> None:
    """256 messages, ~800 KB: dropping messages one render at a time took over a minute (quadratic)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    renders: list[int] = []

    def render(msgs: list[dict[str, str]]) -> list[int]:
        renders.append(len(msgs))
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    history = long_history()
    assert len(history) == 256 and sum(len(m["content"]) for m in history) > 750_000
    started = time.perf_counter()
    ids, max_new = fit_prompt(history, render, max_model_len=2048, max_tokens=256)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"fitting took {elapsed:.2f} s"
    assert len(renders) <= 20  # O(log n) renders, not one per dropped message
    assert max_new == 256 and len(ids) <= 2048 - 256
    text = tok.decode(ids)
    assert isinstance(text, str)
    assert text.startswith("<|im_start|>system\nSYSTEM RULES<|im_end|>")
    assert text.endswith("LAST QUESTION: what did the heartbeat say?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") > 10  # the short recent turns were kept, whole


# ------------------------------------------------------------------------------------------ openai


class _SseServer:
    """A minimal OpenAI-style ``/v1/chat/completions`` SSE server on 127.0.0.1 (Starlette + uvicorn)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self.port = 0
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        def chunk(content: str | None, finish: str | None = None, usage: dict[str, int] | None = None) -> str:
            choices = [] if usage else [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
            body = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "up", "choices": choices}
            if usage:
                body["usage"] = {**usage, "total_tokens": sum(usage.values())}
            return f"data: {json.dumps(body)}\n\n"

        async def completions(request: Request) -> StreamingResponse:
            body = await request.json()
            self.bodies.append(body)

            async def events() -> AsyncIterator[str]:
                try:
                    if body["messages"][-1]["content"] == "endless":
                        while True:
                            yield chunk("tick ")
                            await asyncio.sleep(0.02)
                    yield chunk("")  # role-only style chunk
                    for piece in ("Hel", "lo", " world"):
                        yield chunk(piece)
                    yield chunk(None, finish="stop")
                    yield chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 3})
                    yield "data: [DONE]\n\n"
                finally:
                    self.closed.set()

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])

    async def __aenter__(self) -> _SseServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


async def test_openai_engine_streams_and_reports_usage() -> None:
    async with _SseServer() as server:
        eng = OpenAIEngine(f"http://127.0.0.1:{server.port}/v1", api_key=None, model="up", model_name="shown")
        await eng.start()
        try:
            req = GenerationRequest("o-1", USER, max_tokens=9, temperature=0.5, top_p=0.9, stop=["\n"], seed=3)
            deltas = await collect(eng, req)
        finally:
            await eng.stop()
    assert [d.text for d in deltas] == ["Hel", "lo", " world", ""]
    assert [d.finish_reason for d in deltas] == [None, None, None, "stop"]
    assert (deltas[-1].completion_tokens, deltas[-1].prompt_tokens) == (3, 7)
    sent = server.bodies[0]
    assert sent["model"] == "up" and sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    sampling = (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["stop"], sent["seed"])
    assert sampling == (9, 0.5, 0.9, ["\n"], 3)
    assert eng.model_name == "shown" and eng.active_requests == 0


async def test_openai_engine_continues_an_answer_with_vllms_continue_final_message() -> None:
    async with _SseServer() as server:
        eng = OpenAIEngine(f"http://127.0.0.1:{server.port}/v1", api_key=None, model="up")
        await eng.start()
        try:
            await collect(eng, GenerationRequest("o-2", USER, max_tokens=9, assistant_prefix="Once upon"))
        finally:
            await eng.stop()
    sent = server.bodies[0]
    assert sent["messages"][-1] == {"role": "assistant", "content": "Once upon"} and sent["messages"][:-1] == USER
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False


async def test_openai_engine_cancel_closes_the_upstream_stream() -> None:
    async with _SseServer() as server:
        eng = OpenAIEngine(f"http://127.0.0.1:{server.port}/v1", api_key="k", model="up")
        await eng.start()
        try:
            got: list[GenerationDelta] = []

            async def consume() -> None:
                async for d in eng.generate(GenerationRequest("o-2", [{"role": "user", "content": "endless"}])):
                    got.append(d)

            task = asyncio.create_task(consume())
            while len(got) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert eng.active_requests == 0
            await asyncio.wait_for(server.closed.wait(), 5)  # the server saw the disconnect
        finally:
            await eng.stop()


# ------------------------------------------------------------------------------------------ selection


def test_make_engine_picks_by_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    eng = make_engine(Settings(engine="transformers", model=str(tiny_model_dir), state_dir=tmp_path))
    assert isinstance(eng, TransformersEngine) and eng.model_name == "tiny-model"
    eng = make_engine(Settings(engine="openai", openai_base_url="http://127.0.0.1:1/v1", model="org/up", state_dir=tmp_path))
    assert isinstance(eng, OpenAIEngine) and eng.model == "org/up" and eng.model_name == "up"
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        make_engine(Settings(engine="openai", openai_base_url="", model="m", state_dir=tmp_path))
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine(Settings(engine="onnx", state_dir=tmp_path))


async def test_vllm_engine_without_vllm_says_so(tmp_path: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed")
    settings = Settings(engine="vllm", model="org/m", vllm_speculative_config='{"method": "ngram"}', state_dir=tmp_path)
    eng = make_engine(settings)
    assert eng.speculative_config == {"method": "ngram"}  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="'vllm' package"):
        await eng.start()


async def test_a_repeated_prefix_is_reported_as_cached_tokens(tiny_model_dir: Path) -> None:
    """Continuous batching shares full KV blocks of a prompt prefix it has seen (transformers' prefix
    sharing); the engine reports how many prompt tokens that served (usage.prompt_tokens_details.cached_tokens)."""
    eng = TransformersEngine(str(tiny_model_dir), device="cpu", max_model_len=2048, mode="continuous_batching")
    await eng.start()
    try:
        history = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))}, {"role": "assistant", "content": "noted"}]

        async def last(question: str) -> GenerationDelta:
            req = GenerationRequest(request_id=question, messages=[*history, {"role": "user", "content": question}], max_tokens=4, temperature=0)
            deltas = [d async for d in eng.generate(req)]
            return deltas[-1]

        first = await last("first question?")
        second = await last("second question?")
    finally:
        await eng.stop()
    assert first.cached_tokens == 0
    assert second.prompt_tokens > 300 and 0 < second.cached_tokens < second.prompt_tokens  # whole blocks of the shared history
