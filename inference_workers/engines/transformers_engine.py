"""In-process generation with Hugging Face ``transformers`` (any causal LM id or local path, CPU or GPU).

Two modes, chosen with ``mode=``:

``"continuous_batching"`` (the DEFAULT): transformers' own continuous batching
    (``model.init_continuous_batching`` → ``ContinuousBatchingManager``, paged KV cache, one background
    thread that steps every in-flight request together). It works on CPU with the tiny model (tested
    with transformers 5.17: concurrent requests, cancellation, stop strings, engine stop) and batches
    concurrent requests into one forward pass, so throughput grows with concurrency instead of the
    requests fighting over the cores — that is why it is the default. Measured on a 2-core CPU with
    the tiny model, 256-token completions, aggregate tokens/s for 1 / 4 / 8 concurrent requests:
    continuous batching ~390 / ~750 / ~870, threads ~650 / ~400 / ~320. A lone request is faster in
    ``"threads"`` mode (less per-step bookkeeping); a worker serving several turns at once is not the
    lone-request case. On CPU the paged cache is sized explicitly (block 32 tokens, enough blocks for
    ``max_concurrency`` full-length requests); on CUDA transformers sizes it from free GPU memory. Outputs reach asyncio through the manager's
    ``register_result_handler`` (``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request);
    an abort is ``cancel_request`` (the request leaves the batch at the manager's next step).

    Per-request sampling support in this mode (``ContinuousBatchingConfig(per_request_processors=True)``):
    ``max_tokens`` → ``max_new_tokens`` (per request), ``temperature`` and ``top_p`` (per request, via the
    CB logits processors, which exist only because the base generation config sets non-neutral
    placeholders), ``temperature == 0`` → greedy, emulated with a per-request ``top_k = 1``. NOT
    supported: a per-request ``seed`` — the manager seeds one process-wide RNG when it starts; ``seed``
    is ignored (logged at debug level). Sampling uses ``torch.multinomial`` on the manager thread.

``"threads"``: each request runs ``model.generate`` in a worker thread (at most ``max_concurrency`` at a
    time) with a token streamer and a ``StoppingCriteria`` that checks the request's abort flag after
    every token. Simpler and independent of the continuous-batching code, but concurrent requests do not
    share forward passes. ``seed`` is applied with ``torch.manual_seed`` right before ``generate``,
    which is process-global: reproducible only when no other request runs at the same time.

Both modes: the chat template is applied with the tokenizer; the prompt is truncated from the left
(system message kept) to ``max_model_len - max_tokens`` tokens (:func:`fit_prompt`), all of it in a
worker thread (``asyncio.to_thread``), never on the event loop; token ids are
detokenized incrementally so multi-byte characters are never split; stop strings are matched on the
text (the request is aborted on a hit). ``completion_tokens`` includes the end-of-turn token.

Errors: :meth:`start` raises ``OSError``/``ValueError`` from ``from_pretrained`` for a bad model id or
path; a failed generation raises ``RuntimeError`` from the iteration.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inference_workers.engines import base
from inference_workers.engines.base import FINISH_LENGTH, FINISH_STOP, Engine, GenerationDelta, GenerationRequest, IncrementalDetokenizer, StopMatcher
from inference_workers.engines.transformers_loading import DTYPES, load
from inference_workers.engines.transformers_streams import CbStream, ThreadStream, cb_still_scheduled, start_manager

logger = logging.getLogger(__name__)

MODES = ("continuous_batching", "threads")
_MODE_ALIASES = {"cb": "continuous_batching", "continuous_batching": "continuous_batching", "threads": "threads"}


class TransformersEngine(Engine):
    """See the module docstring.

    Args:
        model: Hugging Face id or local directory.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``…
        max_model_len: context length in tokens (prompt + completion).
        model_name: the name reported to clients (default: ``model``).
        mode: ``"continuous_batching"`` (default, alias ``"cb"``) or ``"threads"``.
        dtype: ``"auto"`` — on CUDA bf16 (fp16 where bf16 is unsupported); on CPU the checkpoint's own dtype,
            with fp16 read as bf16 (CPU fp16 kernels are slow) — or ``"float32"``, ``"bfloat16"``,
            ``"float16"``. On 2 CPU cores bf16 prefills Qwen2.5-0.5B ~3x faster than fp32 (README).
        max_concurrency: requests generating at once; more wait in line (and count as active).
        cb_config: a ``ContinuousBatchingConfig`` overriding the engine's sizing (continuous batching).
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        max_model_len: int = 2048,
        model_name: str | None = None,
        mode: str = "continuous_batching",
        max_concurrency: int = 8,
        cb_config: Any = None,
        dtype: str = "auto",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if mode not in _MODE_ALIASES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.model_path = model
        self.model_name = model_name or model.rstrip("/").rsplit("/", 1)[-1]
        self.device_request = device
        self.max_model_len = max_model_len
        self.mode = _MODE_ALIASES[mode]
        self.max_concurrency = max_concurrency
        self._cb_config_override = cb_config
        self.dtype_request = dtype
        self._sampling_defaults = (1.0, 1.0)  # (temperature, top_p) from generation_config.json once loaded

        self.device: Any = None  # torch.device once started
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self._vocab_size = 0
        self._started = False
        self._slots: asyncio.Semaphore | None = None
        self._ids = itertools.count()
        self._waiting = 0  # generate() calls waiting for a slot
        # continuous batching
        self._manager: Any = None
        self._cb_live: set[str] = set()  # submitted, not finished, not cancelled
        self._cb_cancelling: set[str] = set()  # cancelled, not yet confirmed gone from the manager
        self._prefix_hits: dict[str, int] = {}  # request id -> prompt tokens prefix sharing served (transformers_streams)
        self._prefix_watched = False
        # threads
        self._executor: ThreadPoolExecutor | None = None
        self._threads_lock = threading.Lock()
        self._thread_live: dict[str, threading.Event] = {}  # request -> abort flag, while its thread runs

    # ----------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        await asyncio.to_thread(self._load)
        self._slots = asyncio.Semaphore(self.max_concurrency)
        if self.mode == "continuous_batching":
            await asyncio.to_thread(self._start_manager)
        else:
            self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="tf-generate")
        self._started = True
        logger.info(
            "transformers engine ready: %s on %s (%s, mode %s, max_model_len %d)",
            self.model_path,
            self.device,
            self._model.dtype,
            self.mode,
            self.max_model_len,
        )

    def _load(self) -> None:
        loaded = load(self.model_path, self.device_request, self.dtype_request, self.max_model_len)
        self.device, self._model, self._tokenizer, self._eos_ids = loaded.device, loaded.model, loaded.tokenizer, loaded.eos_ids
        self.max_model_len, self._sampling_defaults, self._vocab_size = loaded.max_model_len, loaded.sampling_defaults, loaded.vocab_size
        base.warm_up_render(self._render)  # before generate() renders in several threads at once

    def _pad_id(self) -> int | None:
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else (min(self._eos_ids) if self._eos_ids else None)

    def _start_manager(self) -> None:
        self._manager = start_manager(self)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self._manager is not None:
            manager, self._manager = self._manager, None
            await asyncio.to_thread(manager.stop, block=True, timeout=30, hard_stop=True)
            await asyncio.to_thread(manager.destroy)
            self._cb_live.clear()
            self._cb_cancelling.clear()
        if self._executor is not None:
            with self._threads_lock:
                for flag in self._thread_live.values():
                    flag.set()
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._model = None
        logger.info("transformers engine stopped")

    # ----------------------------------------------------------------------------------- introspection

    @property
    def active_requests(self) -> int:
        """Requests the engine still spends (or will spend) compute on: waiting for a slot, generating, or
        cancelled but not yet dropped by the backend. Drops to 0 shortly after every consumer is done."""
        if self.mode == "threads":
            with self._threads_lock:
                running = len(self._thread_live)
            return self._waiting + running
        self._prune_cancelled()
        return self._waiting + len(self._cb_live) + len(self._cb_cancelling)

    def _prune_cancelled(self) -> None:
        manager = self._manager
        if manager is None or not manager.is_running():
            self._cb_cancelling.clear()
            return
        for rid in list(self._cb_cancelling):
            if not cb_still_scheduled(manager, rid):
                self._cb_cancelling.discard(rid)

    def count_prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._render(messages, tools))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, prefix: str = "") -> list[int]:
        text = base.render_chat(self._tokenizer, messages, tools, prefix)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], int]:
        """Prompt token ids and ``max_new_tokens`` for ``req`` (blocking: run it in a worker thread)."""
        render = functools.partial(self._render, tools=req.tools, prefix=req.assistant_prefix)
        return base.fit_prompt(req.messages, render, self.max_model_len, req.max_tokens, req.max_prompt_tokens)

    # ----------------------------------------------------------------------------------- generation

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        if not self._started or self._slots is None:
            raise RuntimeError("engine not started")
        self._waiting += 1  # preparing the prompt counts as waiting: it is compute spent on the request
        try:
            # Chat template + tokenization + fitting is CPU-bound and grows with the request (hundreds of
            # KB of history): never on the event loop, which must keep serving other requests and the
            # Kafka consumer's heartbeats.
            ids, max_new = await asyncio.to_thread(self._prepare, req)
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        prompt_tokens = len(ids)
        detok = IncrementalDetokenizer(self._tokenizer)
        stopper = StopMatcher(req.stop)
        generated = 0
        try:
            stream = self._open(req, ids, max_new)
            try:
                while True:
                    update = await stream.next()
                    generated += len(update.new_ids)
                    text, hit = stopper.feed(detok.add(update.new_ids))
                    if hit:
                        yield GenerationDelta(text, generated, prompt_tokens, FINISH_STOP, stream.cached_tokens)
                        return
                    if update.done:
                        tail, hit = stopper.feed(detok.flush())
                        text += tail if hit else tail + stopper.flush()
                        last = detok.ids[-1] if detok.ids else None
                        reason = FINISH_STOP if hit or last in self._eos_ids else FINISH_LENGTH
                        yield GenerationDelta(text, generated, prompt_tokens, reason, stream.cached_tokens)
                        return
                    if text:
                        yield GenerationDelta(text, generated, prompt_tokens, None)
            finally:
                stream.close()
        finally:
            self._slots.release()

    def _open(self, req: GenerationRequest, ids: list[int], max_new: int) -> CbStream | ThreadStream:
        rid = f"{req.request_id}#{next(self._ids)}"
        if self.mode == "continuous_batching":
            return CbStream(self, rid, req, ids, max_new)
        return ThreadStream(self, rid, req, ids, max_new)


__all__ = ["DTYPES", "MODES", "TransformersEngine"]
