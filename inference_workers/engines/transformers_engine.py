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
import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from inference_workers.engines.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    GenerationDelta,
    GenerationRequest,
    IncrementalDetokenizer,
    StopMatcher,
    end_of_turn_id,
    fit_prompt,
    resolve_sampling,
    sampling_defaults,
    warm_up_render,
)

logger = logging.getLogger(__name__)

MODES = ("continuous_batching", "threads")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_MODE_ALIASES = {"cb": "continuous_batching", "continuous_batching": "continuous_batching", "threads": "threads"}

# Fallback for models without a chat template (base models): ChatML.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class _Update:
    """What a backend stream reports: tokens generated since the last update, and the end."""

    new_ids: list[int] = field(default_factory=list)
    done: bool = False


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
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.device_request == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device_request)
        if self.dtype_request != "auto":
            dtype: Any = getattr(torch, self.dtype_request)
        elif device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = "auto"  # transformers reads the checkpoint's own dtype (local folder or hub id alike)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if not getattr(tokenizer, "chat_template", None):
            logger.warning("%s has no chat template; using ChatML", self.model_path)
            tokenizer.chat_template = _CHATML
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if device.type == "cpu" and model.dtype == torch.float16:
            model.to(torch.bfloat16)  # type: ignore[arg-type]  # CPU fp16 kernels are slow; bf16 keeps the range fp16 weights need
        model.to(device)  # type: ignore[arg-type]  # torch stubs type Module.to loosely
        model.eval()

        eos: set[int] = set()
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        for value in (gen_eos, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        if not eos:
            logger.warning("%s defines no end-of-sequence token: generations end at max_tokens", self.model_path)
        text_config = model.config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < self.max_model_len:
            logger.warning(
                "max_model_len %d exceeds the %d positions of %s; using %d",
                self.max_model_len,
                positions,
                self.model_path,
                positions,
            )
            self.max_model_len = positions
        self.device, self._model, self._tokenizer, self._eos_ids = device, model, tokenizer, eos
        self._sampling_defaults = sampling_defaults(model.generation_config)
        self._vocab_size = int(text_config.vocab_size)
        warm_up_render(self._render)  # before generate() renders in several threads at once

    def _pad_id(self) -> int | None:
        pad = self._tokenizer.pad_token_id
        return pad if pad is not None else (min(self._eos_ids) if self._eos_ids else None)

    def _start_manager(self) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # Placeholders that are NOT neutral, so that transformers creates the temperature / top-k / top-p
        # processors; every request overrides all three through per-request kwargs.
        gen_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=self._vocab_size,
            top_p=0.5,
            max_new_tokens=self.max_model_len,
            eos_token_id=sorted(self._eos_ids) or None,
            pad_token_id=self._pad_id(),
        )
        cb_config = self._cb_config_override
        if cb_config is None:
            if self.device.type == "cpu":
                block = 32
                per_request = math.ceil(self.max_model_len / block) + 1
                cb_config = ContinuousBatchingConfig(
                    block_size=block,
                    num_blocks=per_request * (self.max_concurrency + 1),
                    max_batch_tokens=512,
                    max_requests_per_batch=self.max_concurrency,
                    per_request_processors=True,
                )
            else:
                cb_config = ContinuousBatchingConfig(
                    per_request_processors=True, max_requests_per_batch=self.max_concurrency
                )
        elif not cb_config.per_request_processors:
            raise ValueError("cb_config.per_request_processors must be True (per-request sampling)")
        manager = self._model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        manager.start()
        self._manager = manager

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
            if not self._cb_still_scheduled(manager, rid):
                self._cb_cancelling.discard(rid)

    @staticmethod
    def _cb_still_scheduled(manager: Any, rid: str) -> bool:
        """Best effort, reading the manager's internals: is ``rid`` queued, scheduled or being cancelled?"""
        try:
            if rid in list(manager.cancel_queue.queue):
                return True
            if any(getattr(state, "request_id", None) == rid for state in list(manager.input_queue.queue)):
                return True
            processor = manager.batch_processor
            if processor is None:
                return False
            scheduler = processor.scheduler
            return (
                rid in scheduler.active_requests
                or rid in scheduler.waiting_requests
                or rid in scheduler._requests_to_cancel
            )
        except (AttributeError, RuntimeError):  # internals changed, or mutated while we looked
            return True

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._render(messages))

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], int]:
        """Prompt token ids and ``max_new_tokens`` for ``req`` (blocking: run it in a worker thread)."""
        return fit_prompt(req.messages, self._render, self.max_model_len, req.max_tokens, req.max_prompt_tokens)

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
                        yield GenerationDelta(text, generated, prompt_tokens, FINISH_STOP)
                        return
                    if update.done:
                        tail, hit = stopper.feed(detok.flush())
                        text += tail if hit else tail + stopper.flush()
                        last = detok.ids[-1] if detok.ids else None
                        reason = FINISH_STOP if hit or last in self._eos_ids else FINISH_LENGTH
                        yield GenerationDelta(text, generated, prompt_tokens, reason)
                        return
                    if text:
                        yield GenerationDelta(text, generated, prompt_tokens, None)
            finally:
                stream.close()
        finally:
            self._slots.release()

    def _open(self, req: GenerationRequest, ids: list[int], max_new: int) -> _CbStream | _ThreadStream:
        rid = f"{req.request_id}#{next(self._ids)}"
        if self.mode == "continuous_batching":
            return _CbStream(self, rid, req, ids, max_new)
        return _ThreadStream(self, rid, req, ids, max_new)


class _CbStream:
    """One request in the continuous-batching manager, bridged to asyncio."""

    def __init__(self, engine: TransformersEngine, rid: str, req: GenerationRequest, ids: list[int], max_new: int):
        from transformers.generation.continuous_batching.requests import RequestStatus

        manager = engine._manager
        if manager is None or not manager.is_running():
            raise RuntimeError("continuous batching manager is not running")
        self._failed = RequestStatus.FAILED
        self._engine = engine
        self._manager = manager
        self.rid = rid
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._seen = 0
        self._done = False
        if req.seed is not None:
            logger.debug("request %s: per-request seed is not supported in continuous batching; ignored", rid)
        temperature, top_p = resolve_sampling(req, engine._sampling_defaults)
        if temperature <= 0:
            kwargs = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            kwargs = {"temperature": temperature, "top_k": engine._vocab_size, "top_p": top_p}
        manager.register_result_handler(rid, self._queue.put_nowait)
        accepted = manager.add_request(
            input_ids=ids,
            request_id=rid,
            max_new_tokens=max_new,
            streaming=True,
            eos_token_id=sorted(engine._eos_ids) or None,
            **kwargs,
        )
        if accepted is None:
            self._unregister()
            raise RuntimeError("continuous batching manager refused the request (stopping?)")
        engine._cb_live.add(rid)

    async def next(self) -> _Update:
        output = await self._queue.get()
        while not self._queue.empty():  # coalesce: each output carries all tokens so far
            output = self._queue.get_nowait()
        if output.error is not None or output.status == self._failed:
            self._finish()
            raise RuntimeError(f"generation failed: {output.error}")
        tokens = output.generated_tokens
        new_ids, self._seen = list(tokens[self._seen :]), len(tokens)
        if output.is_finished():
            self._finish()
            return _Update(new_ids, done=True)
        return _Update(new_ids)

    def _finish(self) -> None:
        self._done = True
        self._engine._cb_live.discard(self.rid)
        self._unregister()

    def _unregister(self) -> None:
        router = self._manager.output_router
        with router._lock:  # the manager only drops handlers of requests that finish normally
            router.result_handlers.pop(self.rid, None)

    def close(self) -> None:
        """Abort if still running (consumer gone, or stop string hit). Idempotent, never blocks."""
        if self._done:
            return
        self._done = True
        self._manager.cancel_request(self.rid)
        self._unregister()
        self._engine._cb_live.discard(self.rid)
        self._engine._cb_cancelling.add(self.rid)
        logger.debug("request %s cancelled in the continuous batching manager", self.rid)


class _ThreadStream:
    """One request running ``model.generate`` in a worker thread, bridged to asyncio."""

    def __init__(self, engine: TransformersEngine, rid: str, req: GenerationRequest, ids: list[int], max_new: int):
        if engine._executor is None:
            raise RuntimeError("engine not started")
        self._engine = engine
        self.rid = rid
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._abort = threading.Event()
        self._done = False
        loop = asyncio.get_running_loop()
        with engine._threads_lock:
            engine._thread_live[rid] = self._abort
        try:
            engine._executor.submit(self._run, loop, req, ids, max_new)
        except RuntimeError:
            with engine._threads_lock:
                engine._thread_live.pop(rid, None)
            raise

    def _push(self, loop: asyncio.AbstractEventLoop, kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # loop closed: nobody is listening any more
            self._abort.set()

    def _run(self, loop: asyncio.AbstractEventLoop, req: GenerationRequest, ids: list[int], max_new: int) -> None:
        import torch
        from transformers import (
            GenerationConfig,
            StoppingCriteria,
            StoppingCriteriaList,
        )
        from transformers.generation.streamers import BaseStreamer

        engine = self._engine
        abort = self._abort
        push = self._push

        class _Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                push(loop, "tokens", [int(t) for t in value.reshape(-1).tolist()])

            def end(self) -> None:
                pass

        class _Abort(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), abort.is_set(), dtype=torch.bool, device=input_ids.device)

        try:
            if abort.is_set():  # aborted (or engine stopping) before it started
                push(loop, "error", RuntimeError("request aborted before it started"))
                return
            temperature, top_p = resolve_sampling(req, engine._sampling_defaults)
            greedy = temperature <= 0
            config = GenerationConfig(
                max_new_tokens=max_new,
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else top_p,
                top_k=None if greedy else 0,  # no top-k: OpenAI semantics, whatever the model's defaults
                eos_token_id=sorted(engine._eos_ids) or None,
                pad_token_id=engine._pad_id(),
            )
            model = engine._model
            if model is None:
                raise RuntimeError("engine stopped")
            input_ids = torch.tensor([ids], dtype=torch.long, device=engine.device)
            if req.seed is not None:
                torch.manual_seed(req.seed)
            with torch.inference_mode():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=config,
                    streamer=_Streamer(),
                    stopping_criteria=StoppingCriteriaList([_Abort()]),
                )
            if abort.is_set():  # stopped early: by close() (nobody listens) or by engine.stop()
                push(loop, "error", RuntimeError("request aborted"))
            else:
                push(loop, "end", None)
        except Exception as exc:  # reported to the consumer
            logger.exception("generation thread for %s failed", self.rid)
            push(loop, "error", exc)
        finally:
            with engine._threads_lock:
                engine._thread_live.pop(self.rid, None)

    async def next(self) -> _Update:
        update = _Update()
        kind, value = await self._queue.get()
        while True:
            if kind == "tokens":
                update.new_ids.extend(value)
            elif kind == "end":
                self._done = True
                update.done = True
                return update
            else:
                self._done = True
                raise RuntimeError(f"generation failed: {value}") from value
            if self._queue.empty():
                return update
            kind, value = self._queue.get_nowait()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._abort.set()
            logger.debug("request %s aborted (thread mode)", self.rid)


__all__ = ["MODES", "TransformersEngine"]
