"""Prompt assembly with numbered citations (the ``[n]`` convention of RAG answers).

The grounding instruction was chosen on the default model (Qwen2.5-Coder-0.5B-Instruct, greedy) over 16
Python questions with the default knowledge base, three wordings, an answer counted right when it names
the expected API: the earlier "answer the question … if the sources do not answer it, say so rather than
guess" got 14/16 and sometimes made the model echo the question back as its whole answer; this one 16/16,
no echo. Each passage is labelled with its number and its title (page title › section or API entry), else its
source file's name (never the full path: fewer prompt tokens, nothing the model can use). Citations carry
the title, the URL a person can follow and a short snippet.
"""

from __future__ import annotations

from schemas.events import ChatMessage, Citation, Passage


def snippet(text: str, limit: int = 240) -> str:
    """The first ``limit`` characters of ``text`` on one line, cut at a word, with an ellipsis when cut."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", 0, limit)
    return flat[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + "…"


GROUNDING = (
    "You are a helpful Python programming assistant. Answer the user's question directly and correctly; "
    "show a short code example when it helps. Numbered excerpts from the documentation follow: use them "
    "where they are relevant and cite them as [n]. Do not repeat the question."
)


# the same instruction when the excerpts travel with the question (placement "last_user")
GROUNDING_WITH_QUESTION = GROUNDING.replace("excerpts from the documentation follow", "excerpts from the documentation come with the question")
PLACEMENTS = ("system", "last_user")


def _label(source: str) -> str:
    return source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or source


def assemble(messages: list[ChatMessage], passages: list[Passage], placement: str = "system") -> tuple[list[ChatMessage], list[Citation]]:
    """The prompt messages and the citations. ``placement`` ``system`` (the default, the wording measured
    above): a system message carrying the instruction and the sources, then the conversation. ``last_user``:
    the system message carries only the instruction and the sources open the last user message, so the
    prompt up to that message is the same on every turn of a conversation and an engine's prefix cache can
    reuse it (``CHATBUS_GROUNDING_PLACEMENT``, ``bench/prefix_affinity.py``). Raises ValueError for another
    placement."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not passages:
        return list(messages), []
    blocks = [f"[{i}] {p.title or _label(p.source)}\n{p.text}" for i, p in enumerate(passages, 1)]
    rest = list(messages)
    if placement == "system":
        system = GROUNDING + "\n\n" + "\n\n".join(blocks)
    else:
        system = GROUNDING_WITH_QUESTION
        last = max((i for i, m in enumerate(rest) if m.role == "user"), default=None)
        if last is None:
            rest.append(ChatMessage(role="user", content="Sources:\n\n" + "\n\n".join(blocks)))
        else:
            question = rest[last]
            rest[last] = question.model_copy(update={"content": "Sources:\n\n" + "\n\n".join(blocks) + "\n\nQuestion: " + (question.content or "")})
    if rest and rest[0].role in ("system", "developer"):
        system = rest.pop(0).content + "\n\n" + system
    citations = [
        Citation(
            index=i,
            source=p.source,
            position=p.position,
            score=round(p.score, 4),
            title=p.title or _label(p.source),
            url=p.url or p.source,
            snippet=snippet(p.text),
        )
        for i, p in enumerate(passages, 1)
    ]
    return [ChatMessage(role="system", content=system), *rest], citations
