"""Follow-up detection and the standalone query (retrieval_workers.query)."""

from __future__ import annotations

import pytest

from retrieval_workers.query import is_follow_up, standalone_query
from schemas.events import ChatMessage


@pytest.mark.parametrize(
    "text",
    [
        "and for the keys?",
        "What about sets?",
        "how about in reverse order",
        "does it work with bytes too?",
        "Same for tuples",
        "why?",
        "and then?",
        "can it be nested",
    ],
)
def test_follow_ups(text: str) -> None:
    assert is_follow_up(text)


@pytest.mark.parametrize(
    "text",
    [
        "How do I sort a dictionary by its values?",
        "what is a context manager",
        "itertools.groupby example",
        "How can I measure the execution time of a small snippet of code?",
        "dataclass frozen",
    ],
)
def test_standalone_questions(text: str) -> None:
    assert not is_follow_up(text)


def test_standalone_query_joins_a_follow_up_with_the_previous_user_turn() -> None:
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="How do I compress a file with gzip?"),
        ChatMessage(role="assistant", content="Use gzip.open."),
    ]
    assert standalone_query([*history, ChatMessage(role="user", content="and to decompress it?")]) == (
        "How do I compress a file with gzip? and to decompress it?",
        True,
    )
    assert standalone_query([*history, ChatMessage(role="user", content="How do I read a TOML file?")]) == ("How do I read a TOML file?", False)
    assert standalone_query([ChatMessage(role="user", content="and for writing?")]) == ("and for writing?", False)  # nothing to join
    assert standalone_query([]) == ("", False)
