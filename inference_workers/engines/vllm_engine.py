"""Generation with vLLM's V1 ``AsyncLLM`` (GPU): continuous batching, paged KV cache, prefix caching.

``vllm`` is optional and NOT in the CPU requirements: it is imported inside :meth:`VllmEngine.start`,
which raises ``RuntimeError`` naming the missing package when it is absent.

Per request: the chat template is applied with the engine's tokenizer and the prompt is passed as
token ids (``{"prompt_token_ids": [...]}``, a ``TokensPrompt``) after left truncation
(:func:`fit_prompt`, run in a worker thread with ``asyncio.to_thread``, never on the event loop);
``SamplingParams(max_tokens, temperature, top_p, stop, seed,
output_kind=RequestOutputKind.DELTA)`` — all per request, ``temperature == 0`` is greedy, stop strings
are handled (and excluded from the text) by vLLM. ``completion_tokens`` is the running count of
generated token ids (the EOS token included, as vLLM reports it).

Cancellation: ``AsyncLLM.generate`` aborts its own request when the iteration is cancelled or closed;
:meth:`VllmEngine.generate` additionally awaits ``engine.abort(request_id)`` (idempotent) when it ends
before the request finished.

Errors: vLLM's ``EngineDeadError`` / ``EngineGenerateError`` propagate; a request that vLLM ends with
``finish_reason="abort"`` raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from inference_workers.engines import base
from inference_workers.engines.base import FINISH_LENGTH, FINISH_STOP, Engine, GenerationDelta, GenerationRequest, resolve_sampling

logger = logging.getLogger(__name__)


class VllmEngine(Engine):
    """Args: ``model`` (HF id or path), ``max_model_len`` (tokens), ``gpu_memory_utilization`` (0..1),
    ``quantization`` (e.g. ``"fp8"``, ``"awq"``; ``None`` = from the checkpoint), ``speculative_config``
    (a dict or its JSON text, passed to vLLM as is, e.g. ``{"method": "ngram", "num_speculative_tokens":
    4, "prompt_lookup_max": 4}``), ``model_name`` (reported to clients), ``enable_prefix_caching``,
    ``engine_args`` (further ``AsyncEngineArgs`` fields)."""

    def __init__(
        self,
        model: str,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        quantization: str | None = None,
        speculative_config: str | dict[str, Any] | None = None,
        model_name: str | None = None,
        enable_prefix_caching: bool = True,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(speculative_config, str):
            speculative_config = json.loads(speculative_config) if speculative_config.strip() else None
        self.model_path = model
        self.model_name = model_name or model.rstrip("/").rsplit("/", 1)[-1]
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.quantization = quantization or None
        self.speculative_config = speculative_config
        self.enable_prefix_caching = enable_prefix_caching
        self.engine_args = dict(engine_args or {})
        self._engine: Any = None
        self._tokenizer: Any = None
        self._sampling_params: Any = None
        self._output_kind: Any = None
        self._defaults: tuple[float, float] = (1.0, 1.0)  # (temperature, top_p) from generation_config.json
        self._active: set[str] = set()
        self._ids = itertools.count()

    @property
    def active_requests(self) -> int:
        """Requests submitted to vLLM and not yet finished or aborted."""
        return len(self._active)

    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind, SamplingParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(f"engine 'vllm' needs the 'vllm' package, which is not installed (pip install vllm; needs a CUDA GPU): {exc}") from exc
        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=self.model_name,
            enable_prefix_caching=self.enable_prefix_caching,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            quantization=self.quantization,
            speculative_config=self.speculative_config,
            **self.engine_args,
        )
        # Building the engine loads weights and profiles memory (minutes): keep the event loop free.
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        tokenizer = engine.get_tokenizer()  # sync in current vLLM, a coroutine in older releases
        if inspect.isawaitable(tokenizer):
            tokenizer = await tokenizer
        self._engine, self._tokenizer = engine, tokenizer
        await asyncio.to_thread(base.warm_up_render, self._render)  # before generate() renders in threads
        self._sampling_params, self._output_kind = SamplingParams, RequestOutputKind
        self._defaults = await asyncio.to_thread(base.load_sampling_defaults, self.model_path)
        logger.info("vllm engine ready: %s (max_model_len %d)", self.model_path, self.max_model_len)

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
            logger.info("vllm engine stopped")

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, prefix: str = "") -> list[int]:
        text = base.render_chat(self._tokenizer, messages, tools, prefix)
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def count_prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int | None:
        return len(self._render(messages, tools)) if self._tokenizer is not None else None

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        engine = self._engine
        if engine is None:
            raise RuntimeError("engine not started")
        # Chat template + tokenization + fitting is CPU-bound and grows with the request: off the event loop.
        render = functools.partial(self._render, tools=req.tools, prefix=req.assistant_prefix)
        ids, max_new = await asyncio.to_thread(base.fit_prompt, req.messages, render, self.max_model_len, req.max_tokens, req.max_prompt_tokens)
        engine = self._engine
        if engine is None:
            raise RuntimeError("engine stopped")
        temperature, top_p = resolve_sampling(req, self._defaults)
        params = self._sampling_params(
            max_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            stop=list(req.stop) or None,
            seed=req.seed,
            output_kind=self._output_kind.DELTA,
        )
        rid = f"{req.request_id}#{next(self._ids)}"
        completion_tokens = 0
        finished = False
        self._active.add(rid)
        outputs = engine.generate({"prompt_token_ids": ids}, params, rid)
        try:
            async for out in outputs:
                choice = out.outputs[0]
                completion_tokens += len(choice.token_ids)
                if out.finished:
                    finished = True
                    reason = choice.finish_reason
                    if reason not in (FINISH_STOP, FINISH_LENGTH):
                        raise RuntimeError(f"vLLM ended request {rid} with finish_reason={reason!r}")
                    yield GenerationDelta(choice.text, completion_tokens, len(ids), reason, int(getattr(out, "num_cached_tokens", 0) or 0))
                    return
                if choice.text:
                    yield GenerationDelta(choice.text, completion_tokens, len(ids), None)
            raise RuntimeError(f"vLLM stream for {rid} ended without a finished output")
        finally:
            self._active.discard(rid)
            if not finished:
                await outputs.aclose()
                if self._engine is not None:
                    await self._engine.abort(rid)
