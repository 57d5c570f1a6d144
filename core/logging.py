"""Logging set-up for the entry points (the CLI's commands, the tiny-model builder, model provisioning).

One format on stderr: ``TIME LEVEL LOGGER: MESSAGE`` (``short`` leaves the time out, for builders that print a
line per step). The chattiest libraries (Kafka clients, HTTP, MongoDB, sentence-transformers) are held at
WARNING whatever the level.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SHORT_FORMAT = "%(levelname)s %(name)s: %(message)s"
NOISY = ("aiokafka", "kafka", "httpx", "pymongo", "sentence_transformers")


def level_of(name: str | int) -> int:
    """A level number from a name such as ``"info"`` (any case); an unknown name is INFO."""
    if isinstance(name, int):
        return name
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


def setup_logging(level: str | int = logging.INFO, *, short: bool = False) -> None:
    """``logging.basicConfig`` on stderr at ``level`` (a name or a number); quiets :data:`NOISY` to WARNING."""
    logging.basicConfig(level=level_of(level), format=SHORT_FORMAT if short else FORMAT, stream=sys.stderr)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["FORMAT", "NOISY", "SHORT_FORMAT", "level_of", "setup_logging"]
