"""How :class:`~inference_workers.engines.transformers_engine.TransformersEngine` runs one request, bridged to asyncio.

* :class:`CbStream`: a request in transformers' ``ContinuousBatchingManager`` (started by
  :func:`start_manager`; outputs arrive through ``register_result_handler`` on the manager's thread and are
  handed to the loop's queue; an abort is ``cancel_request``).
* :class:`ThreadStream`: a request running ``model.generate`` in a worker thread, with a token streamer and a
  stopping criterion that checks the request's abort flag after every token.

Both report :class:`Update` (the token ids generated since the last one, and whether the generation ended).
Sampling parameters come from :func:`~inference_workers.engines.base.resolve_sampling`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference_workers.engines.base import GenerationRequest, resolve_sampling

if TYPE_CHECKING:
    from inference_workers.engines.transformers_engine import TransformersEngine

logger = logging.getLogger("inference_workers.engines.transformers_engine")


@dataclass
class Update:
    """What a backend stream reports: tokens generated since the last update, and the end."""

    new_ids: list[int] = field(default_factory=list)
    done: bool = False


# ----------------------------------------------------------------------------------- continuous batching


def start_manager(engine: TransformersEngine) -> Any:
    """Create and start the engine's ``ContinuousBatchingManager`` (blocking: run it in a worker thread)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # Placeholders that are NOT neutral, so that transformers creates the temperature / top-k / top-p
    # processors; every request overrides all three through per-request kwargs.
    gen_config = GenerationConfig(  # type: ignore[no-untyped-call]  # untyped in transformers
        do_sample=True,
        temperature=0.5,
        top_k=engine._vocab_size,
        top_p=0.5,
        max_new_tokens=engine.max_model_len,
        eos_token_id=sorted(engine._eos_ids) or None,
        pad_token_id=engine._pad_id(),
    )
    cb_config = engine._cb_config_override
    if cb_config is None:
        if engine.device.type == "cpu":
            block = 32
            per_request = math.ceil(engine.max_model_len / block) + 1
            cb_config = ContinuousBatchingConfig(
                block_size=block,
                num_blocks=per_request * (engine.max_concurrency + 1),
                max_batch_tokens=512,
                max_requests_per_batch=engine.max_concurrency,
                per_request_processors=True,
            )
        else:
            cb_config = ContinuousBatchingConfig(per_request_processors=True, max_requests_per_batch=engine.max_concurrency)
    elif not cb_config.per_request_processors:
        raise ValueError("cb_config.per_request_processors must be True (per-request sampling)")
    manager = engine._model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
    manager.start()
    return manager


def watch_prefix_hits(manager: Any, hits: dict[str, int]) -> bool:
    """Record, per request id, the prompt tokens the paged cache's prefix sharing served (``hits``), by
    wrapping ``PagedAttentionCache.search_prefix_match`` of the manager's batch processor — transformers'
    internals (5.x), best effort: returns False (nothing recorded, cached tokens reported as 0) when they
    are not there yet or not as expected. Idempotent."""
    cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
    search = getattr(cache, "search_prefix_match", None)
    if cache is None or search is None or not getattr(cache, "use_prefix_sharing", False):
        return False
    if getattr(search, "_chatbus_wrapped", False):
        return True

    def recorded(request_id: str, prompt_ids: list[int]) -> int:
        length = int(search(request_id, prompt_ids))
        if length > 0:
            hits[request_id] = min(length, max(0, len(prompt_ids) - 1))  # the scheduler keeps one token to prefill
            while len(hits) > 10_000:  # requests whose stream never read theirs
                hits.pop(next(iter(hits)))
        return length

    recorded._chatbus_wrapped = True  # type: ignore[attr-defined]
    cache.search_prefix_match = recorded
    return True


def cb_still_scheduled(manager: Any, rid: str) -> bool:
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
        return rid in scheduler.active_requests or rid in scheduler.waiting_requests or rid in scheduler._requests_to_cancel
    except (AttributeError, RuntimeError):  # internals changed, or mutated while we looked
        return True


class CbStream:
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
        if not engine._prefix_watched:
            engine._prefix_watched = watch_prefix_hits(manager, engine._prefix_hits)
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

    async def next(self) -> Update:
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
            return Update(new_ids, done=True)
        return Update(new_ids)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the paged cache's prefix sharing served for this request (0: none, or unknown)."""
        return self._engine._prefix_hits.get(self.rid, 0)

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
        self._engine._prefix_hits.pop(self.rid, None)  # the engine read it with the last delta
        if self._done:
            return
        self._done = True
        self._manager.cancel_request(self.rid)
        self._unregister()
        self._engine._cb_live.discard(self.rid)
        self._engine._cb_cancelling.add(self.rid)
        logger.debug("request %s cancelled in the continuous batching manager", self.rid)


# ----------------------------------------------------------------------------------- threads


class ThreadStream:
    """One request running ``model.generate`` in a worker thread, bridged to asyncio."""

    cached_tokens = 0  # model.generate shares no cache across requests

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
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
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
            config = GenerationConfig(  # type: ignore[no-untyped-call]  # untyped in transformers
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

    async def next(self) -> Update:
        update = Update()
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


__all__ = ["CbStream", "ThreadStream", "Update", "cb_still_scheduled", "start_manager"]
