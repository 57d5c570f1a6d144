"""The ``chatbus`` command line (click).

Users: ``chat``, ``ingest``, ``kb``. Operators: ``stack up|down|run|status``, ``topics``, ``lag``, ``dlq``.
Batch jobs: ``batch submit|status|list|wait|results|cancel|rebuild``.
Analysts: ``feedback tail``, ``dpo export``. Safety reviewers: ``review list|decide``.
Operators of tenants: ``keys create|list|revoke|usage``.
Processes: ``edge``, ``worker safety|retrieval|inference|recorder|batches|feedback`` (what the stack and compose.yaml
start). Builders: ``make-tiny-model``, ``models list|provision``. Configuration comes from ``CHATBUS_*`` environment variables.

The commands live in :mod:`chatbus.commands` (one module per audience); this module only groups them under
:func:`main`, the console script ``chatbus`` and ``python -m chatbus.cli``.
"""

from __future__ import annotations

import click

from chatbus.commands.analysts import dpo, feedback
from chatbus.commands.batch import batch
from chatbus.commands.kb import kb
from chatbus.commands.keys import keys
from chatbus.commands.models import make_tiny_model, models
from chatbus.commands.processes import edge, worker
from chatbus.commands.review import review
from chatbus.commands.stack import stack
from chatbus.commands.users import chat, dlq, ingest, lag, topics


@click.group()
def main() -> None:
    """chatbus: event-driven LLM chat over Kafka."""


for _command in (worker, edge, stack, chat, ingest, kb, topics, lag, dlq, make_tiny_model, models, feedback, dpo, batch, review, keys):
    main.add_command(_command)

__all__ = ["main"]

if __name__ == "__main__":  # last: every command group above is registered by now
    main()
