"""Dead letters (producers.bus.dead_letter) keep where a message came from and mask its PII."""

from __future__ import annotations


def test_dead_letters_mask_pii() -> None:
    from aiokafka import ConsumerRecord

    from core.config import Settings
    from producers.bus import dead_letter
    from schemas.events import decode as decode_event

    raw = b'{"messages":[{"content":"mail jane.doe@example.com"}]'
    record = ConsumerRecord("chat.requests", 2, 41, 0, 0, b"conv-1", raw, None, 6, len(raw), ())
    letter = decode_event(dead_letter(Settings(), record, "safety", "not JSON").value)
    assert "jane.doe@example.com" not in letter.value and "[EMAIL]" in letter.value  # type: ignore[union-attr]
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == ("chat.requests", 2, 41, "conv-1")  # type: ignore[union-attr]
