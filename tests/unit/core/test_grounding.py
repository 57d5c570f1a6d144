"""The grounding prompt (core.grounding.assemble)."""

from __future__ import annotations

from core.grounding import assemble
from schemas.events import ChatMessage, Passage


def test_prompt_numbers_sources_and_keeps_the_system_message() -> None:
    msgs = [ChatMessage(role="system", content="Be terse."), ChatMessage(role="user", content="q?")]
    passages = [
        Passage(chunk_id="1", text="alpha", source="a.md", position=0, score=0.9),
        Passage(chunk_id="2", text="beta", source="b.md", position=3, score=0.5),
    ]
    prompt, cites = assemble(msgs, passages)
    assert prompt[0].role == "system" and prompt[0].content.startswith("Be terse.")
    assert "[1] a.md\nalpha" in prompt[0].content and "[2] b.md\nbeta" in prompt[0].content
    assert prompt[1:] == msgs[1:]
    assert [(c.index, c.source) for c in cites] == [(1, "a.md"), (2, "b.md")]
    assert assemble(msgs, []) == (msgs, [])


def test_sources_with_the_question_keep_the_conversation_prefix_fixed() -> None:
    history = [
        ChatMessage(role="system", content="Be terse."),
        ChatMessage(role="user", content="first?"),
        ChatMessage(role="assistant", content="one."),
    ]
    turn2 = [*history, ChatMessage(role="user", content="second?")]
    turn3 = [*turn2, ChatMessage(role="assistant", content="two."), ChatMessage(role="user", content="third?")]
    p2, _ = assemble(turn2, [Passage(chunk_id="1", text="alpha", source="a.md", position=0, score=0.9)], "last_user")
    p3, _ = assemble(turn3, [Passage(chunk_id="2", text="beta", source="b.md", position=0, score=0.9)], "last_user")
    assert p2[:3] == p3[:3]  # system and history alike on both turns: a prefix cache reuses them
    assert "alpha" not in p2[0].content and p2[0].content.startswith("Be terse.")
    assert p3[-1].content == "Sources:\n\n[1] b.md\nbeta\n\nQuestion: third?"
    assert p3[1:3] == turn3[1:3]
