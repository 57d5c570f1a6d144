"""The topic registry: every topic chatbus uses, with its partitions, key, retention and purpose.

Topics are created idempotently at start-up (:func:`topics.clients.ensure_topics`). Names may be
prefixed with ``CHATBUS_TOPIC_PREFIX`` so several deployments (or test runs) share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    purpose: str
    retention_ms: int = 7 * DAY_MS
    compacted: bool = False
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        cfg = {"retention.ms": str(self.retention_ms)}
        cfg["cleanup.policy"] = "compact,delete" if self.compacted else "delete"
        cfg.update(self.extra_config)
        return cfg


CHAT_REQUESTS = "chat.requests"
CHAT_SCREENED = "chat.screened"
CHAT_GROUNDED = "chat.grounded"
CHAT_REPLIES = "chat.replies"
CHAT_CONTROL = "chat.control"
CHAT_DLQ = "chat.dlq"
KB_INGEST = "kb.ingest"
KB_SOURCES = "kb.sources"
BATCH_REQUESTS = "batch.requests"
BATCH_SCREENED = "batch.screened"
BATCH_GROUNDED = "batch.grounded"
BATCH_RESULTS = "batch.results"
BATCH_JOBS = "batch.jobs"
CHAT_FEEDBACK = "chat.feedback"
DPO_PAIRS = "dpo.pairs"
KTO_EXAMPLES = "kto.examples"
SAFETY_REVIEW = "safety.review"
CACHE_ENTRIES = "cache.entries"

# The batch lane: the same stages as interactive chat on topics of its own, so every stage can take
# interactive turns first (see consumers.stage.StageWorker and the inference worker's admission).
BATCH_LANE = {CHAT_REQUESTS: BATCH_REQUESTS, CHAT_SCREENED: BATCH_SCREENED, CHAT_GROUNDED: BATCH_GROUNDED}

REGISTRY: tuple[TopicSpec, ...] = (
    TopicSpec(CHAT_REQUESTS, 6, "conversation_id", "chat turns as received by an edge or a batch job", DAY_MS),
    TopicSpec(CHAT_SCREENED, 6, "conversation_id", "turns the safety worker allowed, PII masked, with the query embedding", DAY_MS),
    TopicSpec(CHAT_GROUNDED, 6, "conversation_id", "turns with retrieved passages and the assembled prompt, ready for generation", DAY_MS),
    TopicSpec(
        CHAT_REPLIES,
        8,
        "conversation_id",
        "token and completion events; each edge instance owns one partition (its reply_to)",
        6 * HOUR_MS,
        extra_config={"segment.ms": str(HOUR_MS)},
    ),
    TopicSpec(CHAT_CONTROL, 3, "conversation_id", "cancel events, read by every inference worker (no consumer group)", HOUR_MS),
    TopicSpec(CHAT_DLQ, 1, "source key", "dead letters: undecodable or unprocessable messages with the reason", 14 * DAY_MS),
    TopicSpec(KB_INGEST, 1, "source path", "embedded chunks for the retrieval worker (the Milvus owner) to upsert", 7 * DAY_MS),
    # the catalogue of indexed documents (compacted, kept forever): the ingest client skips unchanged files
    TopicSpec(KB_SOURCES, 1, "source path", "what the knowledge base holds per document (hash, title, chunks); null = deleted", -1, compacted=True),
    TopicSpec(BATCH_REQUESTS, 6, "conversation_id", "batch lines as chat turns (source=batch), reply_to batch.results", 7 * DAY_MS),
    TopicSpec(BATCH_SCREENED, 6, "conversation_id", "the batch lane of chat.screened", 7 * DAY_MS),
    TopicSpec(BATCH_GROUNDED, 6, "conversation_id", "the batch lane of chat.grounded (taken only when interactive turns leave room)", 7 * DAY_MS),
    TopicSpec(BATCH_RESULTS, 6, "conversation_id", "completions of batch lines (no token events)", 7 * DAY_MS),
    TopicSpec(BATCH_JOBS, 1, "batch id", "batch created / cancelled events; stages tail it for cancels, the batch store is rebuilt from it", 30 * DAY_MS),
    # feedback and the preference dataset (schemas.feedback); 6 partitions like chat.requests/chat.screened,
    # all keyed by conversation id, so the feedback app's tables are co-partitioned with its sources
    TopicSpec(CHAT_FEEDBACK, 6, "conversation_id", "thumbs ratings and pairwise preferences from people (POST /v1/feedback)", 365 * DAY_MS),
    TopicSpec(DPO_PAIRS, 3, "record id", "curated DPO pairs, TRL conversational format; a null value deletes a record", 365 * DAY_MS, compacted=True),
    TopicSpec(
        KTO_EXAMPLES, 3, "record id", "curated KTO examples, TRL conversational unpaired format; a null value deletes a record", 365 * DAY_MS, compacted=True
    ),
    TopicSpec(CACHE_ENTRIES, 3, "tenant", "answers for the semantic cache, upserted into Milvus by the retrieval worker", DAY_MS),
    TopicSpec(SAFETY_REVIEW, 3, "conversation_id", "turns for human safety review (close blocks, flags, retractions) and reviewers' decisions", 365 * DAY_MS),
)


@dataclass(frozen=True)
class GroupSpec:
    """A consumer group: who reads what. ``stage`` groups must have a live member for ``/readyz``."""

    group_id: str
    topics: tuple[str, ...]
    stage: bool = True


SAFETY = GroupSpec("chatbus-safety", (CHAT_REQUESTS, BATCH_REQUESTS))
RETRIEVAL = GroupSpec("chatbus-retrieval", (CHAT_SCREENED, BATCH_SCREENED))
RETRIEVAL_INGEST = GroupSpec("chatbus-retrieval-ingest", (KB_INGEST, CACHE_ENTRIES), stage=False)
INFERENCE = GroupSpec("chatbus-inference", (CHAT_GROUNDED, BATCH_GROUNDED))
RECORDER = GroupSpec("chatbus-recorder", (CHAT_REQUESTS, CHAT_SCREENED, CHAT_GROUNDED, CHAT_REPLIES, SAFETY_REVIEW))
# the batch store: materialises batch.jobs / batch.results (and batch dead letters)
BATCHES = GroupSpec("chatbus-batches", (BATCH_JOBS, BATCH_RESULTS, CHAT_DLQ), stage=False)
GROUPS: tuple[GroupSpec, ...] = (SAFETY, RETRIEVAL, RETRIEVAL_INGEST, INFERENCE, RECORDER, BATCHES)


def lane(name: str, source: str) -> str:
    """The registry name of stage topic ``name`` (e.g. ``chat.screened``) for a turn's lane."""
    return BATCH_LANE[name] if source == "batch" else name


def topic(name: str, prefix: str = "") -> str:
    """The physical topic name for a registry name."""
    return f"{prefix}{name}"


def spec(name: str) -> TopicSpec:
    for s in REGISTRY:
        if s.name == name:
            return s
    raise KeyError(f"unknown topic {name!r}")
