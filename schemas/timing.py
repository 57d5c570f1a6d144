"""Per-turn latency split across the bus, from the stage marks a turn carries (``_Event.stages``).

Every stage stamps wall-clock seconds (``time.time()``) on the event it passes on:

====================  ===========================================================
mark                  set by
====================  ===========================================================
``edge_received``     edge, request read (before validation)
``edge_published``    edge, just before the turn is produced to ``chat.requests``
``safety_start/end``  safety worker, around screening (PII masking, embedding)
``retrieval_start/end`` retrieval worker, around the vector search
``inference_dequeued`` inference worker, turn taken from ``chat.grounded``
``inference_scheduled`` inference worker, generation slot granted (inference_workers.fair)
``first_token``       inference worker, first token out of the engine
``last_token``        inference worker, generation finished
``first_relayed``     edge, first content chunk handed to the client's stream
``last_relayed``      edge, completion handed to the client's stream
====================  ===========================================================

:func:`breakdown` turns them into *stages* (a process's own work), *hops* (transport + queueing
between two stages: producer batching, broker append and replication, the consumer's fetch, and any
wait in the next stage's queue) and the TTFT as the edge sees it. The marks come from several
processes, so hops assume their clocks agree (true on one host; across hosts it needs NTP, and a hop
can come out slightly negative — it is reported as measured, not clamped).
"""

from __future__ import annotations

from collections.abc import Mapping

# name: (from mark, to mark), in the order a turn passes them
STAGES: dict[str, tuple[str, str]] = {
    "edge": ("edge_received", "edge_published"),
    "safety": ("safety_start", "safety_end"),
    "retrieval": ("retrieval_start", "retrieval_end"),
    "queue": ("inference_dequeued", "inference_scheduled"),  # waiting for a generation slot (the fair queue)
    "prefill": ("inference_scheduled", "first_token"),  # the engine's own TTFT: its queue + prefill + first step
    "decode": ("first_token", "last_token"),
}
HOPS: dict[str, tuple[str, str]] = {
    "edge→safety": ("edge_published", "safety_start"),
    "safety→retrieval": ("safety_end", "retrieval_start"),
    "retrieval→inference": ("retrieval_end", "inference_dequeued"),
    "inference→edge": ("first_token", "first_relayed"),  # the first token event's trip back to the edge
}
TOTALS: dict[str, tuple[str, str]] = {
    "ttft": ("edge_received", "first_relayed"),
    "e2e": ("edge_received", "last_relayed"),
}


def span(stages: Mapping[str, float], start: str, end: str) -> float | None:
    """``stages[end] - stages[start]`` in seconds, or None if either mark is missing."""
    a, b = stages.get(start), stages.get(end)
    return None if a is None or b is None else b - a


def breakdown(stages: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``{"stages": {name: s}, "hops": {name: s}, "totals": {...}}`` — seconds, only spans whose two marks exist.

    ``totals`` also holds ``hops`` (the sum of the three forward hops, when all are known) and
    ``bus_overhead`` (TTFT − the inference worker's time to first token, queue included, i.e. what the bus and
    the other stages add). Marks from before ``inference_scheduled`` existed give ``prefill`` from
    ``inference_dequeued``.
    """
    out: dict[str, dict[str, float]] = {"stages": {}, "hops": {}, "totals": {}}
    for group, spans in (("stages", STAGES), ("hops", HOPS), ("totals", TOTALS)):
        for name, (a, b) in spans.items():
            value = span(stages, a, b)
            if value is not None:
                out[group][name] = value
    forward = [out["hops"].get(h) for h in ("edge→safety", "safety→retrieval", "retrieval→inference")]
    if all(v is not None for v in forward):
        out["totals"]["hops"] = sum(v for v in forward if v is not None)
    worker_ttft = span(stages, "inference_dequeued", "first_token")
    if "prefill" not in out["stages"] and "inference_scheduled" not in stages and worker_ttft is not None:
        out["stages"]["prefill"] = worker_ttft
    if "ttft" in out["totals"] and worker_ttft is not None:
        out["totals"]["bus_overhead"] = out["totals"]["ttft"] - worker_ttft
    return out


def server_timing(parts: dict[str, dict[str, float]]) -> str:
    """The breakdown as a W3C ``Server-Timing`` header value (durations in ms), e.g. ``safety;dur=23.1``."""
    items = []
    for group in ("stages", "hops", "totals"):
        for name, seconds in parts.get(group, {}).items():
            token = name.replace("→", "-to-")
            items.append(f"{token};dur={seconds * 1000:.1f}")
    return ", ".join(items)
