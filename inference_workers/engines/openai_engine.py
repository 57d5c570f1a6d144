"""Generation by any OpenAI-compatible upstream (OpenAI, a vLLM or llama.cpp server, …), streamed.

``chat.completions.create(stream=True, stream_options={"include_usage": True})`` through
``openai.AsyncOpenAI``. The upstream applies its own chat template, stop strings, seed and context limit.

Token counts: while streaming, ``completion_tokens`` counts content chunks (servers such as vLLM send
about one token per chunk) and ``prompt_tokens`` is 0; the final delta carries the upstream's ``usage``
when it sends one (``include_usage``), else the chunk count. Finish reasons: ``"stop"`` and
``"length"`` pass through, ``"content_filter"`` too; ``"tool_calls"``/``"function_call"`` map to
``"stop"``.

Tools: ``req.tools`` and ``req.tool_choice`` go to the upstream, which parses its model's calls; the calls it
streams back (``delta.tool_calls``, accumulated by ``index``) are handed on as Hermes ``<tool_call>`` text in
the last delta, so the worker treats every engine's calls alike (:mod:`core.tools`). The worker sets no
tool-call ``assistant_prefix`` here (``applies_prefix`` False): the upstream enforces ``tool_choice`` itself.
A prefix it does set (a rerouted turn continuing a partial answer) goes as a final assistant message with
vLLM's ``continue_final_message`` (and ``add_generation_prompt`` false) in the request body; an upstream
without that parameter ignores or refuses it.

Cancellation: closing the generator (or cancelling its task) closes the HTTP stream, which a
vLLM-style server takes as an abort of the request.

Errors: ``openai.APIError`` subclasses (connection, timeout, HTTP status) propagate from the iteration;
a stream that ends without a finish reason raises ``RuntimeError``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from inference_workers.engines.base import FINISH_LENGTH, FINISH_STOP, Engine, GenerationDelta, GenerationRequest

logger = logging.getLogger(__name__)

_FINISH_MAP = {
    "stop": FINISH_STOP,
    "length": FINISH_LENGTH,
    "content_filter": "content_filter",
    "tool_calls": FINISH_STOP,
    "function_call": FINISH_STOP,
}


def hermes_calls(calls: dict[int, dict[str, str]]) -> str:
    """Calls streamed by an upstream (``{index: {"name", "arguments"}}``) as Hermes ``<tool_call>`` blocks."""
    out = []
    for _, call in sorted(calls.items()):
        try:
            args: Any = json.loads(call["arguments"] or "{}")
        except json.JSONDecodeError:
            args = call["arguments"]  # left for the worker's check to refuse with its reason
        out.append("<tool_call>\n" + json.dumps({"name": call["name"], "arguments": args}, ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(out)


def openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A prompt message as the OpenAI API takes it: tool-call arguments as JSON text (chat templates take
    them decoded, :meth:`schemas.events.ChatMessage.template_dict`)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    encoded = []
    for c in calls:
        args = c["function"]["arguments"]
        encoded.append({**c, "function": {**c["function"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    return {**message, "tool_calls": encoded}


class OpenAIEngine(Engine):
    """Args: ``base_url`` (e.g. ``http://host:8000/v1``), ``api_key`` (``None`` → ``"EMPTY"``, what local
    servers accept), ``model`` (the upstream's model name), ``model_name`` (reported to clients;
    default ``model``), ``timeout`` (seconds, per HTTP operation), ``max_retries`` (before the first
    byte; default 0: the worker's own redelivery decides)."""

    applies_prefix = False

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        model_name: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 0,
    ) -> None:
        self.base_url = base_url
        self._api_key = api_key or "EMPTY"
        self.model = model
        self.model_name = model_name or model
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: Any = None
        self._active: set[str] = set()
        self._ids = itertools.count()

    @property
    def active_requests(self) -> int:
        """Upstream streams currently open."""
        return len(self._active)

    async def start(self) -> None:
        if self._client is not None:
            return
        import openai

        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=self.max_retries)
        logger.info("openai engine ready: %s at %s", self.model, self.base_url)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if self._client is None:
            raise RuntimeError("engine not started")
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [openai_message(m) for m in req.messages],
            "max_tokens": req.max_tokens,
            **({} if req.temperature is None else {"temperature": req.temperature}),  # None: the upstream's default
            **({} if req.top_p is None else {"top_p": req.top_p}),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.stop:
            kwargs["stop"] = list(req.stop)
        if req.seed is not None:
            kwargs["seed"] = req.seed
        if req.assistant_prefix:  # continue the answer so far (vLLM's chat API; others may ignore it)
            kwargs["messages"].append({"role": "assistant", "content": req.assistant_prefix})
            kwargs["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        if req.tools:
            kwargs["tools"] = req.tools
            kwargs["tool_choice"] = req.tool_choice if req.tool_choice in ("auto", "required") else {"type": "function", "function": {"name": req.tool_choice}}
        key = f"{req.request_id}#{next(self._ids)}"
        self._active.add(key)
        try:
            stream = await self._client.chat.completions.create(**kwargs)
            try:
                chunks = prompt_tokens = 0
                finish: str | None = None
                usage: Any = None
                calls: dict[int, dict[str, str]] = {}
                async for chunk in stream:
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                    for choice in chunk.choices or []:
                        if choice.index != 0:
                            continue
                        text = (choice.delta.content if choice.delta is not None else None) or ""
                        for tc in (choice.delta.tool_calls if choice.delta is not None else None) or []:
                            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                            if tc.function is not None:
                                call["name"] += tc.function.name or ""
                                call["arguments"] += tc.function.arguments or ""
                        if choice.finish_reason:
                            finish = choice.finish_reason
                        if text:
                            chunks += 1
                            yield GenerationDelta(text, chunks, prompt_tokens, None)
                if finish is None:
                    raise RuntimeError("upstream stream ended without a finish_reason")
                completion_tokens = chunks
                if usage is not None:
                    completion_tokens = int(usage.completion_tokens or 0)
                    prompt_tokens = int(usage.prompt_tokens or 0)
                yield GenerationDelta(hermes_calls(calls), completion_tokens, prompt_tokens, _FINISH_MAP.get(finish, FINISH_STOP))
            finally:
                await stream.close()
        finally:
            self._active.discard(key)
