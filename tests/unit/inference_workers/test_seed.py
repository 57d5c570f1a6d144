"""A redelivered attempt samples with the same seed (inference_workers.worker.derived_seed)."""

from __future__ import annotations

from inference_workers.worker import derived_seed


def test_derived_seed_is_stable() -> None:
    assert derived_seed("chatcmpl-x") == derived_seed("chatcmpl-x") != derived_seed("chatcmpl-y")
