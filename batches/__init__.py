"""Batch jobs over the bus: OpenAI Batch API files in, results files out (see README, "Batch jobs").

* :mod:`batches.input` — parsing and validating an input file line by line;
* :mod:`batches.store` — batch state, files and per-line results in the MongoDB API;
* :mod:`batches.errors` — the batch domain's errors (the edge gives them their HTTP status);
* :mod:`batches.service` — the Python API (submit, status, cancel, results) used by the CLI and the edge;
* :mod:`batches.collector` — the worker that materialises the ``batch.*`` topics into the store;
* :mod:`consumers.cancellations` — how the pipeline stages learn that a batch was cancelled.
"""
