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


def _label(source: str) -> str:
    return source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or source


def assemble(messages: list[ChatMessage], passages: list[Passage]) -> tuple[list[ChatMessage], list[Citation]]:
    """The prompt messages (a system message carrying the sources, then the conversation) and the citations."""
    if not passages:
        return list(messages), []
    blocks = [f"[{i}] {p.title or _label(p.source)}\n{p.text}" for i, p in enumerate(passages, 1)]
    system = GROUNDING + "\n\n" + "\n\n".join(blocks)
    rest = list(messages)
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
