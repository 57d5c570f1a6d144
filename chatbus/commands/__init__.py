"""The ``chatbus`` command line's commands, one module per audience; :mod:`chatbus.cli` puts them together.

:mod:`.processes` (``worker``, ``edge``), :mod:`.stack` (``stack up|down|run|status``), :mod:`.users` (``chat``,
``ingest``, and the operators' ``topics``, ``lag``, ``dlq``), :mod:`.models` (``make-tiny-model``, ``models``),
:mod:`.analysts` (``feedback``, ``dpo``), :mod:`.batch` (``batch``). None of them imports :mod:`chatbus.cli`.
"""
