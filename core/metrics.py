"""Prometheus metrics of every chatbus process (prometheus-client), named in the style of vLLM's.

vLLM's server exports ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:e2e_request_latency_seconds``, ``vllm:num_requests_running``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total`` and ``vllm:request_success_total{finished_reason}``
(https://docs.vllm.ai/en/latest/design/metrics.html); chatbus uses the same names under ``chatbus:``
and adds what only a bus has: per-stage and per-hop times, consumer lag, admission decisions, dead
letters. Every time is in seconds, every size is a count.

Which process exports what (each on its own ``/metrics``):

* edge (``/metrics`` on the edge port): TTFT / inter-token / end-to-end latency as the edge relays
  them, the per-turn split into stage work and hops (``chatbus:turn_stage_seconds{stage}``,
  ``chatbus:turn_hop_seconds{hop}``, from the marks each turn carries — :mod:`schemas.timing`), open
  streams, consumer lag of every group, finished turns by reason, admission refusals and brownouts;
* workers (``CHATBUS_METRICS_PORT``, :func:`serve`): their own handler time
  (``chatbus:stage_seconds{stage}``), records handled and dead letters; safety verdicts by category;
  retrieval latency and hits; the inference engine's TTFT, time per output token, running requests and
  token counters (tokens per second = ``rate(chatbus:generation_tokens_total[1m])``).

Metrics are module globals in prometheus-client's default registry: one set per process.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# vLLM's TTFT buckets, with finer steps under 100 ms (a bus hop is milliseconds)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)

# --- edge ------------------------------------------------------------------------------------------------
TTFT = Histogram(
    "chatbus:time_to_first_token_seconds", "Edge received the request -> first content relayed to the client.", ["model_name"], buckets=LATENCY_BUCKETS
)
ITL = Histogram("chatbus:inter_token_latency_seconds", "Gap between successive content chunks relayed to a client.", ["model_name"], buckets=TOKEN_GAP_BUCKETS)
E2E = Histogram("chatbus:e2e_request_latency_seconds", "Edge received the request -> last event relayed.", ["model_name"], buckets=E2E_BUCKETS)
TURN_STAGE = Histogram("chatbus:turn_stage_seconds", "Per turn: time in one stage's own work (from the turn's marks).", ["stage"], buckets=LATENCY_BUCKETS)
TURN_HOP = Histogram(
    "chatbus:turn_hop_seconds", "Per turn: transport and queueing between two stages (from the turn's marks).", ["hop"], buckets=LATENCY_BUCKETS
)
REQUEST_SUCCESS = Counter("chatbus:request_success_total", "Turns finished, by finish reason.", ["model_name", "finished_reason"])
EDGE_GENERATION_TOKENS = Counter("chatbus:edge_generation_tokens_total", "Completion tokens of the turns this edge relayed.", ["model_name"])
OPEN_STREAMS = Gauge("chatbus:edge_open_turns", "Turns this edge is waiting on (streamed and not).")
CONSUMER_LAG = Gauge("chatbus:consumer_lag", "Records not yet committed by a consumer group (end offset - committed), per topic.", ["group", "topic"])
ADMISSION_REJECTED = Counter("chatbus:admission_rejected_total", "Requests answered 429 by admission control.", ["lane", "reason"])
UNAVAILABLE = Counter("chatbus:unavailable_total", "Requests answered 503 because the broker or a stage's workers were unavailable.", ["lane", "reason"])
ROUTED = Counter(
    "chatbus:routed_total",
    "Turns by the model chosen to answer, why (requested, auto, fallback) and whether it stood in for another.",
    ["model_name", "reason", "fallback"],
)
RESPONSE_CACHE = Counter("chatbus:response_cache_total", "Response cache lookups and stores, by cache and result.", ["cache", "result"])
BROWNOUT_CAPPED = Counter("chatbus:brownout_capped_total", "Turns admitted with max_tokens capped by the brownout setting.")

# --- every stage worker -----------------------------------------------------------------------------------
STAGE_SECONDS = Histogram("chatbus:stage_seconds", "A worker's handler time for one record.", ["stage", "lane"], buckets=LATENCY_BUCKETS)
STAGE_RECORDS = Counter("chatbus:stage_records_total", "Records a worker handled.", ["stage", "lane"])
BUS_RETRIES = Counter("chatbus:bus_send_retries_total", "Sends retried because the broker did not acknowledge them (an outage), by worker.", ["worker"])
DEAD_LETTERS = Counter("chatbus:dead_letters_total", "Records sent to the dead-letter topic, by the stage that refused them.", ["stage"])

# --- safety, retrieval -----------------------------------------------------------------------------------
SAFETY_VERDICTS = Counter("chatbus:safety_verdicts_total", "Safety verdicts by action (allow/block) and category.", ["action", "category"])
OUTPUT_RETRACTIONS = Counter("chatbus:output_retractions_total", "Answers the streaming output rail retracted, by category.", ["category"])
OUTPUT_PII = Counter("chatbus:output_pii_masked_total", "Kinds of PII the output rail masked in answers (one per kind per turn).")
EMBEDDING_SECONDS = Histogram("chatbus:embedding_seconds", "Query embedding time (computed once, in the safety stage).", buckets=LATENCY_BUCKETS)
RETRIEVAL_SECONDS = Histogram("chatbus:retrieval_latency_seconds", "Vector search time per turn.", buckets=LATENCY_BUCKETS)
RETRIEVAL_HITS = Histogram("chatbus:retrieval_hits", "Passages retrieved per turn (after the score threshold).", buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16))
RETRIEVAL_SKIPPED = Counter("chatbus:retrieval_skipped_total", "Turns grounded without retrieval, by reason.", ["reason"])

# --- inference ---------------------------------------------------------------------------------------------
ENGINE_TTFT = Histogram(
    "chatbus:engine_time_to_first_token_seconds",
    "Generation slot granted -> first token from the engine (queue in engine + prefill).",
    ["model_name"],
    buckets=LATENCY_BUCKETS,
)
TPOT = Histogram(
    "chatbus:time_per_output_token_seconds", "(last token - first token) / (completion tokens - 1), per turn.", ["model_name"], buckets=TOKEN_GAP_BUCKETS
)
RUNNING = Gauge("chatbus:num_requests_running", "Turns running in this inference worker.", ["lane"])
PROMPT_TOKENS = Counter("chatbus:prompt_tokens_total", "Prompt tokens processed.", ["model_name"])
GENERATION_TOKENS = Counter("chatbus:generation_tokens_total", "Tokens generated.", ["model_name"])

# --- feedback app ------------------------------------------------------------------------------------------
FEEDBACK_RECORDS = Counter("chatbus:feedback_records_total", "Preference records published, retracted or dropped by curation.", ["kind", "action"])


def serve(port: int, host: str = "0.0.0.0", what: str = "worker") -> None:
    """Expose this process's metrics at ``http://host:port/metrics`` (a daemon thread); ``port`` 0 = off."""
    if port <= 0:
        return
    try:
        start_http_server(port, addr=host)
    except OSError as exc:  # metrics are for operators: a taken port must not stop the worker
        log.error("%s: cannot serve metrics on %s:%d (%s); running without", what, host, port, exc)
        return
    log.info("%s metrics on http://%s:%d/metrics", what, host, port)
