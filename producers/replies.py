"""Building the events that travel on a turn's ``reply_to`` (token events and the completion)."""

from __future__ import annotations

from producers.bus import Outgoing
from schemas.events import ChatTurnRequest, Citation, FinishReason, Retraction, SafetyVerdict, TokenEvent, TurnCompleted, Usage, new_id


def to_reply(request: ChatTurnRequest, value: bytes) -> Outgoing:
    """An event produced to the partition the turn's edge instance reads."""
    return Outgoing(request.reply_to.topic, value, key=request.conversation_id.encode(), partition=request.reply_to.partition)


def whole_reply(
    request: ChatTurnRequest,
    text: str,
    finish_reason: FinishReason,
    model: str,
    *,
    stages: dict[str, float],
    verdict: SafetyVerdict | None = None,
    citations: list[Citation] | None = None,
    usage: Usage | None = None,
    error: str | None = None,
    retrieval_status: str = "",
) -> list[Outgoing]:
    """A complete answer in one go (a refusal, an error): one token event and the completion."""
    attempt = new_id()
    out: list[Outgoing] = []
    seq = 0
    if text and request.batch is None:  # the batch lane wants the completion only
        out.append(to_reply(request, token_event(request, attempt=attempt, seq=0, delta=text, text_offset=0, stages=stages).to_bytes()))
        seq = 1
    done = completion(
        request,
        attempt=attempt,
        seq=seq,
        finish_reason=finish_reason,
        text=text,
        model=model,
        stages=stages,
        usage=usage,
        citations=citations,
        verdict=verdict,
        error=error,
        retrieval_status=retrieval_status,
    )
    out.append(to_reply(request, done.to_bytes()))
    return out


def token_event(
    request: ChatTurnRequest, *, attempt: str, seq: int, delta: str, text_offset: int, completion_tokens: int = 0, stages: dict[str, float] | None = None
) -> TokenEvent:
    """One piece of an attempt's text: ``delta`` starts at character ``text_offset`` of the answer; the
    first event of an attempt (``seq`` 0) carries the turn's ``stages`` so far (copied)."""
    return TokenEvent(
        correlation_id=request.correlation_id,
        conversation_id=request.conversation_id,
        attempt=attempt,
        seq=seq,
        delta=delta,
        text_offset=text_offset,
        completion_tokens=completion_tokens,
        stages=dict(stages) if stages is not None else {},
    )


def completion(
    request: ChatTurnRequest,
    *,
    attempt: str,
    seq: int,
    finish_reason: FinishReason,
    text: str,
    model: str,
    stages: dict[str, float],
    usage: Usage | None = None,
    citations: list[Citation] | None = None,
    verdict: SafetyVerdict | None = None,
    error: str | None = None,
    retrieval_status: str = "",
    retraction: Retraction | None = None,
) -> TurnCompleted:
    """The turn's final event (``chat.turn.completed``): ``seq`` follows the attempt's last token event;
    ``stages`` (wall-clock seconds per stage, :mod:`schemas.timing`) is copied."""
    return TurnCompleted(
        correlation_id=request.correlation_id,
        conversation_id=request.conversation_id,
        attempt=attempt,
        stages=dict(stages),
        seq=seq,
        finish_reason=finish_reason,
        text=text,
        model=model,
        usage=usage or Usage(),
        citations=citations or [],
        verdict=verdict,
        error=error,
        retrieval_status=retrieval_status,
        batch=request.batch,
        retraction=retraction,
    )
