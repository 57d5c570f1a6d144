"""Which turns a response cache may answer, and under which key space: shared by the exact cache
(inference_workers.response_cache) and the semantic cache (retrieval_workers.semantic_cache).

Never cached: sampling above temperature 0 (another answer is as right), turns with PII masked in them,
turns the input screen flagged, turns offering tools or carrying tool messages, a rerouted turn continuing a partial answer. The semantic cache also
takes only a conversation's first question (one user message, an optional system prompt): a follow-up
("and the second one?") means something else in every conversation.
"""

from __future__ import annotations

import hashlib

from schemas.events import ChatTurnRequest, SafetyVerdict


def not_cacheable(request: ChatTurnRequest, verdict: SafetyVerdict) -> str | None:
    """Why the turn's answer may not be served from or stored in a cache, or None when it may."""
    if request.sampling.temperature != 0:
        return "sampled"
    if request.pii:
        return "pii"
    if request.continuation is not None:
        return "continued"
    if verdict.flags or not verdict.allowed:
        return "flagged"
    if request.tools or any(m.role == "tool" or m.tool_calls for m in request.messages):
        return "tools"
    return None


def first_question(request: ChatTurnRequest) -> tuple[str, str] | None:
    """``(question, system prompt hash)`` of a conversation's first turn, or None for a later turn (or other roles)."""
    users = [m for m in request.messages if m.role == "user"]
    others = [m for m in request.messages if m.role not in ("user", "system", "developer")]
    if len(users) != 1 or others or not (users[0].content or "").strip():
        return None
    system = "\n".join(m.content or "" for m in request.messages if m.role in ("system", "developer"))
    return users[0].content or "", hashlib.sha256(system.encode()).hexdigest() if system else ""


def tenant_of(request: ChatTurnRequest) -> str:
    """The cache's key space: the stored key's tenant, else the key's identity, else one shared space."""
    return request.tenant or request.owner or "anonymous"


def models_on(setting: str, model: str) -> bool:
    """Whether a ``*_CACHE_MODELS`` setting (served model names, comma separated, or ``*``) names ``model``."""
    names = {m.strip() for m in setting.split(",") if m.strip()}
    return "*" in names or model in names
