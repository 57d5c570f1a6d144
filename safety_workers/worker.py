"""Safety worker: screens every turn on ``chat.requests`` before anything else sees it.

Consumer group ``chatbus-safety`` on ``chat.requests`` and, when no interactive turn is waiting,
``batch.requests`` (the batch lane; its output goes to ``batch.screened``); at-least-once (see
:mod:`consumers.stage`). Lines of a cancelled batch are finished at once as ``cancelled``.

For each turn: PII in every message is masked (:mod:`core.pii`); the last user message is
embedded (all-MiniLM-L6-v2) and screened against the policy's deny patterns, per-category
exemplar similarity, prompt-injection heuristics and the trained classifier (:mod:`core.safety.screen`,
:mod:`core.safety.classifier`). Screened with it, in the same embedding call: its de-obfuscated form
when it differs (:mod:`core.safety.deobfuscate`: homoglyphs, base64, leetspeak, spacing) and, when the
conversation has earlier user turns, the last :data:`RECENT_TURNS` user messages joined (a request split
across messages); the strictest verdict wins. An allowed turn
goes on to ``chat.screened`` with its masked messages, its verdict and the query embedding (so retrieval
need not embed again). A blocked turn never reaches generation: a refusal and a completion with
``finish_reason="content_filter"`` go straight to the turn's ``reply_to``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np
from aiokafka import ConsumerRecord

from consumers.cancellations import CancelledBatches
from consumers.gate import DownstreamGate
from consumers.stage import StageWorker
from core import metrics
from core.config import Settings
from core.embeddings import TextEmbedder, get_embedder
from core.pii import mask_pii
from core.safety.classifier import load_classifier
from core.safety.deobfuscate import variants
from core.safety.policy import load_policy
from core.safety.screen import Screener, ScreenResult
from producers.bus import Outgoing
from producers.replies import whole_reply
from schemas.events import AnyEvent, ChatMessage, ChatTurnRequest, ReviewItem, SafetyVerdict, ScreenedTurn, last_user_text
from topics.registry import BATCH_SCREENED, CHAT_REQUESTS, CHAT_SCREENED, RETRIEVAL, SAFETY, SAFETY_REVIEW, lane, topic

log = logging.getLogger(__name__)

RECENT_TURNS = 3


class SafetyStage:
    def __init__(self, settings: Settings, embedder: TextEmbedder | None = None) -> None:
        self.settings = settings
        self.policy = load_policy(settings.safety_policy)
        self.embedder = embedder or get_embedder(settings.embedding_model, settings.embedding_backend)
        self.classifier = None if settings.safety_classifier == "none" else load_classifier(settings.safety_classifier or None)
        self.screener = Screener(self.policy, self.embedder.encode, default_threshold=settings.safety_similarity_threshold, classifier=self.classifier)
        self.cancelled = CancelledBatches(settings)
        self.review_topic = topic(SAFETY_REVIEW, settings.topic_prefix)

    def screen(self, request: ChatTurnRequest) -> tuple[ChatTurnRequest, SafetyVerdict, list[float]]:
        t0 = time.perf_counter()
        masked: list[ChatMessage] = []
        kinds: set[str] = set(request.pii)  # masked at the edge already; masked again here for older producers
        for m in request.messages:
            text, found = mask_pii(m.content)
            kinds.update(found)
            masked.append(m if text == m.content else m.model_copy(update={"content": text}))  # tool calls kept
        query = last_user_text(masked)
        texts = [query, *variants(query)]
        users = [m.content for m in masked if m.role == "user"]
        if len(users) > 1:
            texts.append("\n".join(users[-RECENT_TURNS:]))
        tool_results = pending_tool_results(masked)  # what tools returned since the last user message: data, never instructions
        t_embed = time.perf_counter()
        vectors = self.embedder.encode(texts + tool_results)
        vectors, tool_vectors = vectors[: len(texts)], vectors[len(texts) :]
        metrics.EMBEDDING_SECONDS.observe(time.perf_counter() - t_embed)
        embedding = vectors[0]
        result = self.screener.screen(query, embedding)
        for text, vector in zip(texts[1:], vectors[1:], strict=True):
            if not result.allowed:
                break
            other = self.screener.screen(text, vector)
            if not other.allowed:
                result = ScreenResult(
                    False,
                    other.category,
                    other.score,
                    sorted({*result.flags, *other.flags}),
                    other.reason + " (in a decoded or multi-turn form)",
                    other.scores,
                    other.margin,
                )
        for text, vector in zip(tool_results, tool_vectors, strict=True):
            if not result.allowed:
                break
            injected = self.tool_injection(text, vector)
            if injected is not None:
                result = injected
        verdict = SafetyVerdict(
            allowed=result.allowed,
            category=result.category,
            score=round(float(result.score), 4),
            policy_version=self.policy.version,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            pii=sorted(kinds),
            flags=list(result.flags),
            reason=result.reason,
            scores=result.scores,
            classifier_version=self.classifier.version if self.classifier else "",
            margin=None if result.allowed else result.margin,
        )
        return request.model_copy(update={"messages": masked}), verdict, embedding.tolist()

    def tool_injection(self, text: str, vector: np.ndarray) -> ScreenResult | None:
        """A tool result carrying instructions for the model (indirect prompt injection, OWASP LLM01): the
        block, or None. Only the injection signal counts here (a tool may fetch text about any subject), at
        ``tool_injection_threshold`` (0.2): data has no business addressing the model, and indirect
        injections that do not say "ignore previous instructions" score 0.21-0.26 on the injection head,
        under the 0.38 the user's own words are held to (README, *Tools*)."""
        other = self.screener.screen(text, vector)
        threshold = self.settings.tool_injection_threshold
        if other.category != "prompt_injection" and other.scores.get("injection", 0.0) < threshold:
            return None
        score = max(other.scores.get("injection", 0.0), other.score if other.category == "prompt_injection" else 0.0)
        return ScreenResult(
            False,
            "prompt_injection",
            score,
            list(other.flags),
            f"a tool result carries instructions for the model (indirect prompt injection, {score:.2f})",
            other.scores,
            other.margin,
        )

    async def handle(self, event: AnyEvent, record: ConsumerRecord) -> Sequence[Outgoing]:
        if not isinstance(event, ChatTurnRequest):
            raise TypeError(f"unexpected {event.event_type} on {record.topic}")
        if event in self.cancelled:
            return whole_reply(event, "", "cancelled", event.model, stages=event.stages)
        event.mark("safety_start")
        masked, verdict, embedding = await asyncio.to_thread(self.screen, event)
        masked.mark("safety_end")
        review = self.review_item(masked, verdict)
        action = "block" if not verdict.allowed else "flag" if verdict.flags else "allow"
        metrics.SAFETY_VERDICTS.labels(action, verdict.category or "none").inc()
        if not verdict.allowed:
            log.info("turn %s blocked: category=%s score=%.3f", event.correlation_id, verdict.category, verdict.score)
            refusal = self.screener.refusal_text(verdict.category)
            out = whole_reply(masked, refusal, "content_filter", event.model, stages=masked.stages, verdict=verdict)
            if review is not None:
                review.response = refusal
                out.append(Outgoing(self.review_topic, review.to_bytes(), key=review.key))
            return out
        screened = ScreenedTurn(
            correlation_id=event.correlation_id,
            conversation_id=event.conversation_id,
            stages=dict(masked.stages),
            request=masked,
            verdict=verdict,
            query_embedding=embedding,
        )
        out_topic = topic(lane(CHAT_SCREENED, event.source), self.settings.topic_prefix)
        out = [Outgoing(out_topic, screened.to_bytes(), key=screened.key)]
        if review is not None:
            out.append(Outgoing(self.review_topic, review.to_bytes(), key=review.key))
        return out

    def review_item(self, masked: ChatTurnRequest, verdict: SafetyVerdict) -> ReviewItem | None:
        """The turn's :class:`ReviewItem` when a person should look at it: blocked with a margin under
        ``settings.review_margin`` (a pattern hit is never a close call), or allowed but flagged."""
        if verdict.allowed and not verdict.flags:
            return None
        margin = verdict.margin if verdict.margin is not None else 1.0
        if not verdict.allowed and margin >= self.settings.review_margin:
            return None
        return ReviewItem(
            correlation_id=masked.correlation_id,
            conversation_id=masked.conversation_id,
            kind="blocked" if not verdict.allowed else "flagged",
            category=verdict.category if not verdict.allowed else ",".join(verdict.flags),
            reason=verdict.reason,
            score=verdict.score,
            margin=margin if not verdict.allowed else 0.0,
            scores=verdict.scores,
            flags=verdict.flags,
            policy_version=verdict.policy_version,
            prompt=masked.messages,
            model=masked.model,
        )


def pending_tool_results(messages: list[ChatMessage]) -> list[str]:
    """The non-empty ``role: "tool"`` contents after the last user message (the results the model is about to read)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    return [m.content for m in messages[last_user + 1 :] if m.role == "tool" and m.content and m.content.strip()]


def build_worker(settings: Settings) -> StageWorker:
    stage = SafetyStage(settings)
    return StageWorker(
        settings,
        "safety",
        SAFETY.group_id,
        SAFETY.topics,
        stage.handle,
        priority_topics=(CHAT_REQUESTS,),
        low_priority_gate=DownstreamGate(settings, BATCH_SCREENED, RETRIEVAL.group_id),
        companions=(stage.cancelled,),
    )
