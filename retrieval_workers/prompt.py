"""Prompt assembly with numbered citations (the ``[n]`` convention of RAG answers)."""

from __future__ import annotations

from schemas.events import ChatMessage, Citation, Passage

GROUNDING = (
    "Answer the user's question. Numbered sources from the knowledge base follow; when you use one, "
    "cite it as [n]. If the sources do not answer the question, say so rather than guess."
)


def assemble(messages: list[ChatMessage], passages: list[Passage]) -> tuple[list[ChatMessage], list[Citation]]:
    """The prompt messages (a system message carrying the sources, then the conversation) and the citations."""
    if not passages:
        return list(messages), []
    blocks = [f"[{i}] ({p.source}#{p.position})\n{p.text}" for i, p in enumerate(passages, 1)]
    system = GROUNDING + "\n\n" + "\n\n".join(blocks)
    rest = list(messages)
    if rest and rest[0].role in ("system", "developer"):
        system = rest.pop(0).content + "\n\n" + system
    citations = [Citation(index=i, source=p.source, position=p.position, score=round(p.score, 4)) for i, p in enumerate(passages, 1)]
    return [ChatMessage(role="system", content=system), *rest], citations
