"""The engine interface the inference worker drives, and helpers shared by the engines.

An :class:`Engine` turns a :class:`GenerationRequest` (chat messages + OpenAI-style sampling parameters)
into an async stream of :class:`GenerationDelta` s. Contract, for every engine:

* ``generate(req)`` is an async generator. Each delta carries the text generated since the previous
  delta (possibly ``""``) and running token counts; the LAST delta, and only it, has ``finish_reason``
  set: ``"stop"`` (end of sequence, or a stop string — the text is cut just before it and the stop
  string is never emitted) or ``"length"`` (``max_tokens`` reached, or the context ``max_model_len``).
* If the consuming task is cancelled, or the generator is closed early (``aclose()``, or dropped), the
  request is aborted inside the engine: no more compute is spent on it.
* Engine failures (model crash, upstream HTTP error) surface as exceptions from the iteration.

Helpers here: :func:`fit_prompt` (left truncation keeping the system message, O(log n) renders),
:class:`IncrementalDetokenizer` (token ids → text without splitting multi-byte characters) and
:class:`StopMatcher` (stop strings on streamed text, holding back a possible partial match).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class GenerationRequest:
    """One generation. ``messages`` is the whole prompt (``[{"role": ..., "content": ...}]``); the engine
    applies the model's chat template. ``max_tokens`` counts completion tokens. ``temperature == 0``
    means greedy; ``temperature`` / ``top_p`` ``None`` mean the model's defaults (:func:`sampling_defaults`).
    ``seed`` is honoured where the engine supports per-request seeds (see each engine)."""

    request_id: str
    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    max_prompt_tokens: int | None = None  # prefill budget: the templated prompt is cut to fit it (None: context only)
    tools: list[dict[str, Any]] | None = None  # OpenAI-format tools, given to the chat template (``tools=``)
    tool_choice: str = "auto"  # an engine that passes tools to an upstream passes this too
    assistant_prefix: str = ""  # text the answer starts with (appended after the generation prompt; not streamed back)


@dataclass
class GenerationDelta:
    """A step of a streamed generation.

    ``text``: text generated since the previous delta (may be ``""``); ``completion_tokens``: running
    total of generated tokens (the end-of-sequence token included, as vLLM counts it);
    ``prompt_tokens``: length of the templated (possibly truncated) prompt in tokens;
    ``finish_reason``: ``None`` while running, then ``"stop"`` or ``"length"`` on the last delta;
    ``cached_tokens``: on the last delta, how many of the prompt's tokens the engine's prefix cache served
    (vLLM's ``num_cached_tokens``; 0 where the engine does not say).
    """

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    cached_tokens: int = 0


class Engine(ABC):
    """A text-generation backend. Start it once, then call :meth:`generate` concurrently."""

    model_name: str
    applies_prefix = True  # renders the prompt itself, so ``assistant_prefix`` is honoured (an upstream's engine: False)

    @abstractmethod
    async def start(self) -> None:
        """Load the model / open connections. Raises ``RuntimeError`` when the backend is unusable."""

    @abstractmethod
    async def stop(self) -> None:
        """Release everything; in-flight generations end with an exception. Safe to call twice."""

    @abstractmethod
    def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the completion of ``req`` (an async generator; see the module docstring)."""

    def count_prompt_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int | None:
        """Token count of ``messages`` (and the ``tools`` the template describes) after the chat template, or
        ``None`` if this engine cannot tell."""
        return None

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


# --------------------------------------------------------------------------------------------------
# prompt fitting


# Roles that open a conversation and are never dropped when the prompt is cut.
LEADING_ROLES = ("system", "developer")

# When the messages hold at most this many characters per context token, the whole prompt is rendered first
# (one render, bounded by a few context lengths: the usual case, where it fits). Beyond that it is rendered
# only if the search below gets that far, which a prompt much longer than the context never does.
_FULL_RENDER_CHARS_PER_TOKEN = 4


def fit_prompt(
    messages: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], list[int]],
    max_model_len: int,
    max_tokens: int,
    max_prompt_tokens: int | None = None,
) -> tuple[list[int], int]:
    """Token ids of the templated prompt, and the number of completion tokens allowed.

    ``render(messages)`` must return the templated prompt's token ids (with the generation prompt).
    When ``prompt + max_tokens`` exceeds ``max_model_len``, the prompt is cut from the left down to
    ``max_model_len - max_tokens`` tokens: first whole messages go, oldest first, keeping the leading
    system/developer messages and the last message; then, if the leading messages plus the last message
    alone are still too long, tokens are cut from the left of what follows the system prefix: the first
    ``len(render(leading messages))`` tokens are kept (the system block; with a ChatML-like template the
    generation prompt it ends with stands in for the next message's header), then the END of the rest —
    the tail of the last message and the generation prompt. If the leading messages alone take the whole
    budget, only the last ``max_model_len - max_new_tokens`` tokens are kept.
    A ``max_tokens`` so large that the prompt would get less than half the context (or less than it
    needs, if it is shorter) is reduced instead; the generation then ends with ``"length"`` earlier.
    ``max_prompt_tokens`` (the prefill budget) caps the prompt further, with the same cutting rules: the
    prompt is at most ``min(max_model_len - max_new_tokens, max_prompt_tokens)`` tokens.

    Cost: O(log n) renders for n messages, never one per dropped message. The search gallops from the
    newest message (keep 1, 2, 4, ... trailing messages) and then bisects, so each render holds at most
    twice as many messages as the part finally kept, and a history far longer than the context is never
    rendered whole. It assumes that dropping a message never makes the rendered prompt longer, which
    holds for chat templates that render messages one after the other.

    Returns ``(prompt_ids, max_new_tokens)``; ``max_new_tokens >= 1`` and
    ``len(prompt_ids) + max_new_tokens <= max_model_len``. Raises ``ValueError`` if ``max_model_len < 2``.
    CPU-bound (chat template + tokenizer): engines run it off the event loop.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
    half = max_model_len // 2
    prompt_cap = max_prompt_tokens if max_prompt_tokens and max_prompt_tokens > 0 else max_model_len
    n_lead = 0
    while n_lead < len(messages) and messages[n_lead].get("role") in LEADING_ROLES:
        n_lead += 1
    lead, rest = list(messages[:n_lead]), list(messages[n_lead:])
    m = len(rest)
    renders: dict[int, list[int]] = {}  # number of trailing messages kept -> token ids

    def keeping(j: int) -> list[int]:
        if j not in renders:
            renders[j] = render(lead + rest[m - j :])
        return renders[j]

    def max_new_for(ids: list[int]) -> int:
        return max(1, min(max_tokens, max_model_len - min(len(ids), half)))

    chars = sum(len(str(msg.get("content") or "")) for msg in messages)
    if m <= 1 or chars <= _FULL_RENDER_CHARS_PER_TOKEN * max_model_len:
        ids = keeping(m)
        max_new = max_new_for(ids)
        if len(ids) <= min(max_model_len - max_new, prompt_cap):
            return ids, max_new
    # From here on the whole prompt is (or will turn out to be) at least half the context or over the prefill
    # budget, so max_new and the budget no longer depend on its exact length.
    max_new = max(1, min(max_tokens, max_model_len - min(half, prompt_cap)))
    budget = min(max_model_len - max_new, prompt_cap)

    good, bad = 0, m + 1  # keeping `good` trailing messages fits (0: none known); keeping `bad` does not
    if m in renders:
        bad = m
    j = 1
    while j < bad:  # gallop from the newest message: 1, 2, 4, ... kept
        if len(keeping(j)) > budget:
            bad = j
            break
        good = j
        if j == m:  # everything fits after all
            return renders[m], max_new_for(renders[m])
        j = min(2 * j, m)
    while bad - good > 1:
        mid = (good + bad) // 2
        if len(keeping(mid)) <= budget:
            good = mid
        else:
            bad = mid

    if good:
        ids = renders[good]
    else:  # even the last message alone is too long: token-level cut after the system prefix
        ids = keeping(min(m, 1))
        prefix = len(render(lead)) if lead else 0
        if prefix >= budget:  # the system message alone does not fit: keep the end of everything
            prefix = 0
        cut = len(ids) - budget
        ids = ids[:prefix] + ids[prefix + cut :]
    logger.info(
        "prompt truncated to %d tokens (%d of %d messages kept, %d renders, max_model_len %d, max_new_tokens %d)",
        len(ids),
        len(lead) + max(good, min(m, 1)),
        len(messages),
        len(renders),
        max_model_len,
        max_new,
    )
    return ids, max_new


def sampling_defaults(generation_config: Any) -> tuple[float, float]:
    """``(temperature, top_p)`` a request gets when it sets neither: the model's ``generation_config``
    values when it samples (``do_sample``), else OpenAI's defaults ``(1.0, 1.0)`` — vLLM's OpenAI server
    reads the same file the same way (``--generation-config auto``). Model authors tune these: Qwen2.5
    ships ``temperature 0.7, top_p 0.8``; a 0.5B model sampled at 1.0 writes visibly worse code."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return 1.0, 1.0
    temperature = getattr(generation_config, "temperature", None)
    top_p = getattr(generation_config, "top_p", None)
    return (float(temperature) if temperature is not None else 1.0, float(top_p) if top_p is not None else 1.0)


def resolve_sampling(req: GenerationRequest, defaults: tuple[float, float]) -> tuple[float, float]:
    """The request's ``(temperature, top_p)``, ``defaults`` (:func:`sampling_defaults`) filling what it left ``None``."""
    temperature = defaults[0] if req.temperature is None else float(req.temperature)
    top_p = defaults[1] if req.top_p is None else float(req.top_p)
    return temperature, top_p


def load_sampling_defaults(model_path: str) -> tuple[float, float]:
    """:func:`sampling_defaults` of the ``generation_config.json`` at ``model_path`` (a folder or a cached
    Hugging Face id); ``(1.0, 1.0)`` when there is none or it cannot be read."""
    try:
        from transformers import GenerationConfig

        return sampling_defaults(GenerationConfig.from_pretrained(model_path))
    except Exception as exc:  # no generation_config.json, offline without a cache, …
        logger.debug("no generation config for %s (%s): OpenAI's sampling defaults", model_path, exc)
        return 1.0, 1.0


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, prefix: str = "") -> str:
    """The prompt text: ``messages`` through the tokenizer's chat template with the generation prompt, the
    ``tools`` given to it (Hugging Face's ``apply_chat_template(tools=...)``; a template that does not use
    them ignores them), and ``prefix`` appended (the start of the answer the model continues)."""
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)) + prefix


def warm_up_render(render: Callable[[list[dict[str, Any]]], list[int]]) -> None:
    """Render a one-message prompt once, before any concurrent use (call it when the engine starts).

    Engines render prompts in worker threads, several at once. The first call of a Hugging Face fast
    tokenizer may reset the padding/truncation that ``tokenizer.json`` configured, which mutates the Rust
    tokenizer and fails ("Already borrowed") if another thread is encoding at that moment; later calls
    only read. A failure here is logged, not raised: a template that rejects this prompt says so on real
    requests.
    """
    try:
        render([{"role": "user", "content": "hi"}])
    except Exception as exc:
        logger.warning("prompt renderer warm-up failed: %s", exc)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token the chat template writes right after an assistant message (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>`` …), if it is a single special token; else ``None``.

    Checkpoints converted from other formats sometimes name another token ``eos`` (a GGUF's tokenizer may
    say ``<|im_start|>``), and a model that ends its turn with a token the engine does not stop on writes
    on into a new turn of its own. Found by rendering a two-message conversation and reading what follows
    the assistant's text, so it holds for any template."""
    marker = "chatbusendofturnprobe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that needs something else: no probe
        return None
    tail = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    if not tail.strip():
        return None
    ids = tokenizer(tail.lstrip(" "), add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    first = int(ids[0])
    return first if first in special or first in added else None


# --------------------------------------------------------------------------------------------------
# incremental detokenization


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Uses the prefix/read-offset scheme (as in vLLM/TGI): text is emitted only once the decoded window
    does not end in U+FFFD, so a UTF-8 character split across byte-level tokens is emitted whole.
    Special tokens (e.g. the end-of-turn token) are skipped. :meth:`flush` emits whatever is held back
    (invalid bytes become U+FFFD) at the end of the generation.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text: str = self._tok.decode(list(ids), skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)
        return text

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids``; return the newly complete text (may be ``""``)."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), decoded leniently."""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


# --------------------------------------------------------------------------------------------------
# stop strings


class StopMatcher:
    """Applies stop strings to streamed text.

    :meth:`feed` returns the text that is safe to emit and whether a stop string was hit. A tail that
    could be the beginning of a stop string is held back until the next feed decides; on a hit, the
    text is cut just before the earliest stop string (which is not emitted). :meth:`flush` releases the
    held-back tail when the generation ends for another reason.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending
