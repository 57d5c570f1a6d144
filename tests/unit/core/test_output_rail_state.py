"""The output rail's per-turn state (core.safety.output.OutputRail) and the output screen on real answers."""

from __future__ import annotations

import pytest

from core.safety.output import OutputRail


def test_nothing_unscreened_is_released_and_releases_end_at_word_boundaries() -> None:
    rail = OutputRail(every_tokens=4, window_tokens=0)
    rail.feed("Hello the", 2)
    assert rail.release() == ""  # nothing screened yet
    assert not rail.due()
    rail.feed("re. More", 4)
    assert rail.due()
    end, tokens, text, start = rail.checkpoint()
    assert start == 0
    assert text == "Hello there. More" and tokens == 4
    rail.passed(end, tokens)
    assert rail.release() == "Hello there. "  # "More" may still grow
    rail.feed(" words", 5)
    assert rail.release() == "More"  # screened, and now a whole word; " words" is not screened
    assert rail.release(final=True) == " words"
    assert rail.shown == "Hello there. More words" and rail.leaked_tokens == 0


def test_the_window_releases_unscreened_tokens_and_counts_the_leak() -> None:
    rail = OutputRail(every_tokens=100, window_tokens=3)
    for i in range(1, 6):
        rail.feed(f"w{i} ", i)
    assert rail.release() == "w1 w2 w3 "  # three tokens ahead of any screen
    assert rail.leaked_tokens == 3


def test_pii_is_masked_and_a_growing_number_is_held_back() -> None:
    rail = OutputRail(every_tokens=1, window_tokens=0)
    rail.feed("Call +1 415 555", 3)
    rail.passed(*rail.checkpoint()[:2])
    assert rail.release() == "Call "  # the number may go on
    rail.feed(" 2671 or mail bob@example.com now", 9)
    rail.passed(*rail.checkpoint()[:2])
    out = rail.release()
    assert "[PHONE]" in out and "[EMAIL]" in out and "555" not in out and "example.com" not in out
    assert {"phone", "email"} <= rail.pii
    assert "bob@example.com" not in rail.withdrawn_text()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        OutputRail(every_tokens=0)
