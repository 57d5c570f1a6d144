"""Fit a grounded turn's prompt to the prefill budget, in tokens, before it reaches the engine.

The retrieval stage assembles the prompt with every passage it found (``GroundedTurn.prompt_messages``).
Prefill costs time in proportion to the prompt (~0.7 s per 1,000 tokens for Qwen2.5-0.5B in bf16 on 2
CPU cores, README), so the worker fits it to ``min(prefill budget, context - completion)`` tokens:

1. passages first: the lowest-ranked passages are dropped until the templated prompt fits, keeping at least
   the best one (its citation numbering is unchanged: passages are numbered by rank, so only the tail goes);
2. then history: the engine's :func:`~inference_workers.engines.base.fit_prompt` drops whole messages from
   the oldest turn (the system message and the last message stay), and cuts tokens only as a last resort.

The citations returned are exactly the passages the prompt still holds, so an answer never cites a source
the model did not see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.grounding import assemble
from schemas.events import Citation, GroundedTurn

log = logging.getLogger(__name__)

Counter = Callable[[list[dict[str, Any]]], int | None]


def prompt_budget(prefill_budget: int, max_model_len: int, max_tokens: int) -> int:
    """Tokens the templated prompt may take: the prefill budget (0 = none) within the context left after
    the completion (``max_tokens``, counted as at most half the context, as ``fit_prompt`` does)."""
    room = max_model_len - min(max_tokens, max_model_len // 2)
    return min(prefill_budget, room) if prefill_budget > 0 else room


def fit_grounded(turn: GroundedTurn, count: Counter, budget: int) -> tuple[list[dict[str, Any]], list[Citation]]:
    """The prompt messages and citations of ``turn`` with as many top-ranked passages as fit ``budget``.

    ``count(messages)`` is the templated prompt's length in tokens (``Engine.count_prompt_tokens``); when it
    returns ``None`` (an engine that cannot count) the turn's prompt is used as assembled. Renders at most
    ``len(passages)`` prompts. CPU-bound (chat template + tokenizer): run it off the event loop.
    """
    messages = [m.template_dict() for m in turn.prompt_messages]
    passages = turn.retrieval.passages
    total = count(messages)
    if total is None or total <= budget or len(passages) <= 1:
        return messages, list(turn.citations)
    kept = len(passages)
    while kept > 1:
        kept -= 1
        prompt, _ = assemble(turn.request.messages, passages[:kept])
        messages = [m.template_dict() for m in prompt]
        n = count(messages)
        if n is not None and n <= budget:
            break
    log.info("prompt of %s fitted to %d tokens: %d of %d passages kept", turn.correlation_id, budget, kept, len(passages))
    return messages, [c for c in turn.citations if c.index <= kept]
