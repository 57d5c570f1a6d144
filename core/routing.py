"""``model: "auto"``: which requests need the primary model, from the request's own text.

:func:`classify` is a heuristic over the user's messages: code, maths or multi-step reasoning signals, or
length, send a request to the primary model; the rest are simple and go to the small one. Its agreement
with a labelled set is measured in ``bench/routing.py`` (README, *Measured*). The edge
(:mod:`edge.routing`) and batch jobs (:mod:`batches.input`) use it.
"""

from __future__ import annotations

import re

from schemas.events import ChatMessage

AUTO = "auto"
LONG_PROMPT_CHARS = 1200  # a request this long (its last user message and history) goes to the primary model

_CODE = re.compile(
    r"```|\b(def|class|import|return|lambda|async|await|const|let|var|fn|impl|struct|SELECT|INSERT|UPDATE|JOIN|"
    r"traceback|exception|stack trace|segfault|compile[rd]?|regex|regexp|function|method|variable|array|"
    r"python|javascript|typescript|java|rust|golang|c\+\+|sql|bash|shell script|dockerfile|yaml|json|html|css|api|"
    r"bug|debug|refactor|unit test|algorithm|recursion|big-?o|complexity)\b|[{};]\s*$|\w+\(\)|\w+\.\w+\(",
    re.IGNORECASE | re.MULTILINE,
)
_REASONING = re.compile(
    r"\b(prove|proof|derive|step by step|step-by-step|explain why|calculate|compute|solve|equation|integral|"
    r"derivative|probability|optimi[sz]e|compare and contrast|trade-?offs?|design a|architecture|analy[sz]e)\b|"
    r"\d+\s*[-+*/^%]\s*\d+",
    re.IGNORECASE,
)


def classify(messages: list[ChatMessage]) -> tuple[bool, str]:
    """``(needs the primary model, why)`` for a request's messages: code, reasoning or length signals in
    the user's text. A heuristic, measured against a labelled set in ``bench/routing.py`` (README)."""
    users = [m.content or "" for m in messages if m.role == "user"]
    last = users[-1] if users else ""
    text = "\n".join(users)
    if _CODE.search(last):
        return True, "code"
    if _REASONING.search(last):
        return True, "reasoning"
    if len(text) > LONG_PROMPT_CHARS or len(last.split()) > 120:
        return True, "long"
    if any(m.tool_calls or m.role == "tool" for m in messages):
        return True, "tools"
    return False, "simple"
