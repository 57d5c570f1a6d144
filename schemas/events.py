"""Event contracts: one typed, versioned definition per message that crosses the bus.

Wire format: a JSON object encoded with orjson, UTF-8. Every event carries

* ``event_type`` — the discriminator (e.g. ``"chat.turn.request"``),
* ``schema_version`` — an integer; within a version fields change only additively,
* ``event_id`` — unique per event (hex UUID4); handlers are idempotent on it,
* ``correlation_id`` — the turn's id (``chatcmpl-…``); every event of one turn shares it,
* ``conversation_id`` — the Kafka key, so a conversation stays ordered on one partition,
* ``created_at`` — epoch seconds (float) when the event was made,
* ``stages`` — epoch-second marks appended by each stage (``edge_received``, ``safety_start`` …),
  carried forward so per-stage and per-hop latency can be computed at the end of a turn.

JSON Schema files for consumers in other languages are generated into ``schemas/json/`` by
``python -m schemas.jsonschema`` (a test checks they are current).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class DecodeError(ValueError):
    """Raised when bytes from the bus are not a valid event (the reason goes to the DLQ)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class FunctionCall(_Model):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's format)


class ToolCall(_Model):
    """A call the model made (OpenAI's ``tool_calls[]``): ``id`` is what the ``role: "tool"`` reply names."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Model):
    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)  # a JSON Schema (https://json-schema.org) for the arguments
    strict: bool | None = None


class ToolSpec(_Model):
    """A tool the client offers (OpenAI's ``tools[]``)."""

    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    tool_calls: list[ToolCall] = Field(default_factory=list)  # an assistant message that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template_dict(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates take it: ``role`` and ``content``, plus ``tool_calls``
        (arguments decoded to an object, as Qwen2.5's and Hermes' templates expect) and ``tool_call_id``
        when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments_object(arguments: str) -> Any:
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments


def last_user_text(messages: list[ChatMessage]) -> str:
    """The text of the last user message (the query a turn is screened and grounded on)."""
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    return messages[-1].content if messages else ""


class SamplingParams(_Model):
    """Generation parameters, OpenAI-compatible meanings. ``max_tokens`` counts completion tokens.

    ``temperature`` / ``top_p`` left ``None`` (the client did not set them) take the served model's own
    defaults from its ``generation_config.json`` (as vLLM's server does), else OpenAI's 1.0."""

    max_tokens: int = Field(default=256, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class ReplyTo(_Model):
    """Where the turn's reply events go: the edge instance holding the client's connection
    (a fixed partition of ``chat.replies``), or ``batch.results`` (``partition=None``: keyed)."""

    topic: str
    partition: int | None = Field(default=None, ge=0)


class BatchRef(_Model):
    """The line of a batch input file a turn came from (``chat.turn.*`` events of the batch lane)."""

    batch_id: str
    custom_id: str
    line: int = Field(ge=1)  # 1-based line number in the input file


class SafetyVerdict(_Model):
    allowed: bool
    category: str = "none"  # the category that decided (or "none")
    score: float = 0.0  # 0..1, the strongest signal seen
    policy_version: str
    latency_ms: float
    pii: list[str] = Field(default_factory=list)  # kinds masked, e.g. ["email", "iban"]
    flags: list[str] = Field(default_factory=list)  # non-blocking findings, e.g. ["prompt_injection"]
    reason: str = ""
    scores: dict[str, float] = Field(default_factory=dict)  # the trained classifier's heads (harm, injection), probabilities 0..1
    classifier_version: str = ""
    margin: float | None = None  # a block: its deciding score minus the threshold it crossed (1.0: a pattern hit)


class Passage(_Model):
    chunk_id: str
    text: str
    source: str
    position: int  # chunk index within its source
    score: float  # the ranking score: cosine similarity (-1..1) for dense search, BM25 for lexical, RRF (sum of 1/(60+rank)) for hybrid
    title: str = ""  # "page title › heading or API entry"
    url: str = ""  # where a person can read it (https://docs.python.org/3.11/<page>#<anchor>, a base URL given at ingest, else the path)
    anchor: str = ""


class RetrievalResult(_Model):
    status: Literal["ok", "skipped"]
    reason: str = ""
    passages: list[Passage] = Field(default_factory=list)
    latency_ms: float = 0.0
    query: str = ""  # the standalone query searched, when the last user message was a follow-up rewritten with context


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache served (OpenAI's prompt_tokens_details.cached_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Citation(_Model):
    index: int  # the [n] used in the prompt
    source: str
    position: int
    score: float
    title: str = ""
    url: str = ""
    snippet: str = ""  # the passage's first ~240 characters


class _Envelope(_Model):
    """What every message on the bus carries, and its wire form (orjson)."""

    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=new_id)
    created_at: float = Field(default_factory=now)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class _Event(_Envelope):
    """An event of one chat turn."""

    correlation_id: str
    conversation_id: str
    stages: dict[str, float] = Field(default_factory=dict)

    def mark(self, stage: str, at: float | None = None) -> None:
        self.stages[stage] = now() if at is None else at

    @property
    def key(self) -> bytes:
        return self.conversation_id.encode()


class RouteInfo(_Model):
    """How the edge chose the model that answers a turn (edge.routing)."""

    requested: str  # the ``model`` the client sent ("auto", or a served model's name)
    reason: str  # why this model, e.g. "requested", "auto: code", "fallback: no live worker"
    fallback_from: str | None = None  # the model that should have answered, when this one stands in for it
    continued_after: int | None = None  # characters of the answer ``fallback_from`` had streamed before its pool died


class Continuation(_Model):
    """An answer already partly streamed to the client by a worker that died: the turn was published again
    (edge.turns ``reroute_stranded``) and its model continues this text instead of starting over (vLLM's
    ``continue_final_message``); the token events' ``text_offset`` count from its start, so the client's
    stream goes on where it stopped. PII-masked like every answer on the bus."""

    text: str
    completion_tokens: int = Field(default=0, ge=0)  # what the first attempt generated (counted in usage)


class ChatTurnRequest(_Event):
    """``chat.requests``: a chat turn as the edge (or a batch job) received it, PII already masked."""

    event_type: Literal["chat.turn.request"] = "chat.turn.request"
    model: str
    messages: list[ChatMessage]
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    reply_to: ReplyTo
    user: str | None = None  # a pseudonym (core.pii.pseudonym), never the id the client sent
    source: Literal["interactive", "batch"] = "interactive"
    batch: BatchRef | None = None  # set on the batch lane (``batch.*`` topics)
    pii: list[str] = Field(default_factory=list)  # kinds of PII masked in ``messages`` before publishing
    owner: str | None = None  # the API key's identity (edge.auth.key_owner: a hash), None on an edge without keys
    tenant: str | None = None  # whose share the inference worker counts it in: the stored key's tenant (None: the owner's)
    tools: list[ToolSpec] = Field(default_factory=list)  # offered to the model (empty: none, or tool_choice "none")
    parallel_tool_calls: bool = True  # False: at most one call per answer
    tool_choice: str = "auto"  # with tools: "auto" (the model decides), "required" (some call), else the one function's name to call
    route: RouteInfo | None = None  # set when the edge routed the turn ("auto") or fell back; ``model`` is the one chosen
    continuation: Continuation | None = None  # the answer so far, when a dead pool's started turn was rerouted


class ScreenedTurn(_Event):
    """``chat.screened``: an allowed turn, its messages PII-masked, with the query embedding computed once."""

    event_type: Literal["chat.turn.screened"] = "chat.turn.screened"
    request: ChatTurnRequest
    verdict: SafetyVerdict
    query_embedding: list[float] | None = None  # L2-normalised, all-MiniLM-L6-v2 (384 floats)


class CachedReply(_Model):
    """A semantic-cache hit (retrieval_workers.semantic_cache): the answer given to a close enough question."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    similarity: float  # cosine of the two questions' embeddings
    question: str  # the question the answer was given to (PII-free: such turns are never cached)


class GroundedTurn(_Event):
    """``chat.grounded``: ready for generation: the prompt with numbered passages, and its sources; or, with
    ``cached`` set, an answer from the semantic cache for the inference worker to stream as is."""

    event_type: Literal["chat.turn.grounded"] = "chat.turn.grounded"
    request: ChatTurnRequest
    verdict: SafetyVerdict
    retrieval: RetrievalResult
    prompt_messages: list[ChatMessage]
    citations: list[Citation] = Field(default_factory=list)
    cached: CachedReply | None = None


class CacheEntry(_Event):
    """``cache.entries``: an answer for the semantic cache (from the inference worker, upserted by the
    retrieval worker, the Milvus owner). Keyed by tenant."""

    event_type: Literal["cache.entry"] = "cache.entry"
    tenant: str
    model: str
    system: str  # SHA-256 of the system prompt the question came with ('' for none)
    question: str
    answer: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    expires_at: float

    @property
    def key(self) -> bytes:
        return self.tenant.encode()


class TokenEvent(_Event):
    """On the turn's ``reply_to``: a coalesced run of generated text.

    ``seq`` counts events of one attempt from 0; ``text_offset`` is the character offset of ``delta``
    in the full completion, so a relay can splice a redelivered attempt without duplicating text.
    """

    event_type: Literal["chat.token"] = "chat.token"
    attempt: str
    seq: int = Field(ge=0)
    delta: str
    text_offset: int = Field(ge=0)
    completion_tokens: int = 0  # running total


FinishReason = Literal["stop", "length", "content_filter", "cancelled", "error", "tool_calls"]


class Retraction(_Model):
    """Why and what the output rail withdrew (:mod:`core.safety.output`): the attempt's text shown so far
    (``withdrawn_chars`` characters of its token events) is withdrawn and the completion's ``text`` is the
    safety message instead. ``withdrawn_text`` is the generated answer, PII-masked, kept for review and
    never shown; ``leaked_tokens``: tokens that had been released before a screen covered them."""

    category: str
    reason: str = ""
    scores: dict[str, float] = Field(default_factory=dict)
    policy_version: str = ""
    withdrawn_chars: int = Field(default=0, ge=0)
    withdrawn_text: str = ""
    leaked_tokens: int = Field(default=0, ge=0)


class TurnCompleted(_Event):
    """On the turn's ``reply_to``: the final event of a turn (exactly one per attempt). With ``retraction``
    set it is the *retraction event*: ``finish_reason`` is ``content_filter``, the text streamed before it
    is withdrawn and ``text`` is the safety message to show instead."""

    event_type: Literal["chat.turn.completed"] = "chat.turn.completed"
    attempt: str
    seq: int = Field(ge=0)
    finish_reason: FinishReason
    text: str
    model: str
    usage: Usage = Field(default_factory=Usage)
    citations: list[Citation] = Field(default_factory=list)
    verdict: SafetyVerdict | None = None
    retrieval_status: str = ""
    error: str | None = None
    batch: BatchRef | None = None  # copied from the request on the batch lane
    retraction: Retraction | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # finish_reason "tool_calls": the calls, arguments valid for their schemas
    cache: Literal["exact", "semantic"] | None = None  # the answer came from a response cache (exact: inference_workers.response_cache)


ReviewKind = Literal["blocked", "flagged", "retracted"]
ReviewVerdict = Literal["correct_block", "should_have_answered", "harmful_answer"]


class ReviewItem(_Event):
    """``safety.review``: a turn for a person to review — blocked with a low margin, flagged, or retracted by
    the output rail. Text is PII-masked: ``prompt`` (the turn's messages), ``response`` (what the user was
    shown: the refusal or safety message; '' for a flagged turn, whose answer the stored turn holds),
    ``withdrawn`` (a retracted answer, never shown). ``margin``: the deciding score minus its threshold
    (small: a close call; 1.0 for a pattern hit)."""

    event_type: Literal["safety.review.item"] = "safety.review.item"
    kind: ReviewKind
    category: str
    reason: str = ""
    score: float = 0.0
    margin: float = 0.0
    scores: dict[str, float] = Field(default_factory=dict)
    flags: list[str] = Field(default_factory=list)
    policy_version: str = ""
    prompt: list[ChatMessage] = Field(default_factory=list)
    response: str = ""
    withdrawn: str = ""
    model: str = ""


class ReviewDecision(_Event):
    """``safety.review``: a reviewer's decision on a :class:`ReviewItem` (same key: the conversation id).
    ``correct_block``: the refusal was right; ``should_have_answered``: an unnecessary refusal (``answer``:
    optionally, the answer the reviewer would have wanted); ``harmful_answer``: the model's answer was harmful.
    ``reviewer`` is who decided (a name or key id, never a secret); ``note`` is PII-masked by the writer."""

    event_type: Literal["safety.review.decision"] = "safety.review.decision"
    decision: ReviewVerdict
    reviewer: str = Field(min_length=1, max_length=200)
    note: str = Field(default="", max_length=2000)
    answer: str | None = Field(default=None, max_length=20000)


class CancelTurn(_Event):
    """``chat.control``: stop generating this turn (client gone, Stop pressed, batch cancelled)."""

    event_type: Literal["chat.turn.cancel"] = "chat.turn.cancel"
    reason: str = "client_disconnected"


class EdgeHeartbeat(_Event):
    """``chat.control``: an edge is alive (every ``edge_heartbeat_s``). ``reply_partition`` is the partition
    its turns reply to; ``watching`` the turns of other edges it streams to a resumed client. Inference
    workers cancel a running turn whose edge stopped beating and that no live edge watches. Inference
    workers beat too (``reply_partition`` None): seeing its own beats tells a worker the bus flows, so an
    edge's silence during a broker outage is not taken for its death. Keyed by the sender's id
    (``conversation_id`` = that id; ``correlation_id`` = ``edge:<id>``)."""

    event_type: Literal["chat.edge.heartbeat"] = "chat.edge.heartbeat"
    edge_id: str
    reply_partition: int | None
    watching: list[str] = Field(default_factory=list)


class KbChunk(_Model):
    chunk_id: str  # sha256 of source + position + text, hex: re-ingesting is idempotent
    text: str  # the body (what prompts and snippets show)
    source: str
    position: int
    embedding: list[float]
    title: str = ""
    heading_path: list[str] = Field(default_factory=list)  # page title first; with the body, what is embedded and indexed
    anchor: str = ""
    url: str = ""
    doc_hash: str = ""


class KbIngest(_Envelope):
    """``kb.ingest``: one part of a document (chunks already embedded by the ingest client) for the Milvus owner.

    ``op="upsert"``: upsert ``chunks``; after the last part (``part == parts - 1``) the worker deletes the
    source's chunks of any other ``doc_hash`` (an older version) and publishes a :class:`KbSource` on
    ``kb.sources``. ``op="delete"``: delete every chunk of ``source`` (and tombstone it on ``kb.sources``).
    Messages without ``source`` (the first format) are plain upserts."""

    event_type: Literal["kb.ingest"] = "kb.ingest"
    chunks: list[KbChunk] = Field(default_factory=list)
    op: Literal["upsert", "delete"] = "upsert"
    source: str | None = None
    doc_hash: str = ""
    title: str = ""
    part: int = Field(default=0, ge=0)
    parts: int = Field(default=1, ge=1)


class KbSource(_Envelope):
    """``kb.sources`` (compacted, key = source): what the knowledge base holds of one document; a null value
    means the document was deleted. The ingest client reads it to skip unchanged files."""

    event_type: Literal["kb.source"] = "kb.source"
    source: str
    doc_hash: str
    title: str = ""
    chunks: int = 0
    url: str = ""


class BatchLineError(_Model):
    """A batch input line that failed validation (it goes to the batch's error file, the rest runs)."""

    line: int = Field(ge=1)
    custom_id: str | None = None
    code: str
    message: str


class _BatchJob(_Envelope):
    """``batch.jobs``: an event of one batch, keyed by its id."""

    batch_id: str

    @property
    def key(self) -> bytes:
        return self.batch_id.encode()


class BatchCreated(_BatchJob):
    """``batch.jobs``: a batch was accepted. Published before its lines; the batch store is rebuilt from it."""

    event_type: Literal["batch.created"] = "batch.created"
    input_file_id: str
    input_sha256: str
    endpoint: str = "/v1/chat/completions"
    completion_window: str = "24h"
    metadata: dict[str, str] = Field(default_factory=dict)
    total: int = Field(ge=0)  # lines in the input file, invalid ones included
    valid: int | None = Field(default=None, ge=0)  # lines published (``invalid`` may be truncated)
    invalid: list[BatchLineError] = Field(default_factory=list)
    owner: str | None = None  # the API key identity that submitted it (edge.auth.key_owner); None: no keys


class BatchCancelled(_BatchJob):
    """``batch.jobs``: stop the batch; every stage finishes its remaining lines as ``cancelled``."""

    event_type: Literal["batch.cancelled"] = "batch.cancelled"
    reason: str = "cancelled by the user"


class DeadLetter(_Envelope):
    """``chat.dlq``: a message a worker could not process, with the reason; the worker moved on."""

    event_type: Literal["dead_letter"] = "dead_letter"
    correlation_id: str | None = None
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    value: str  # the original bytes, decoded as UTF-8 with replacement
    worker: str
    reason: str


AnyEvent = Annotated[
    ChatTurnRequest
    | ScreenedTurn
    | GroundedTurn
    | TokenEvent
    | TurnCompleted
    | CancelTurn
    | EdgeHeartbeat
    | KbIngest
    | KbSource
    | CacheEntry
    | DeadLetter
    | BatchCreated
    | BatchCancelled
    | ReviewItem
    | ReviewDecision,
    Field(discriminator="event_type"),
]
_adapter: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)
E = TypeVar("E", bound=BaseModel)


def load_json(raw: bytes | None) -> Any:
    """Bytes from the bus to a parsed JSON value. Raises :class:`DecodeError` (tombstone, not JSON)."""
    if raw is None:
        raise DecodeError("empty message (tombstone)")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc}") from None


def check_envelope(data: Any) -> dict[str, Any]:
    """``data`` if it is a JSON object of a schema version this worker reads, else :class:`DecodeError`."""
    if not isinstance(data, dict):
        raise DecodeError("not a JSON object")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise DecodeError(f"schema_version {version} is newer than this worker's {SCHEMA_VERSION}")
    return data


def invalid(what: str, exc: ValidationError) -> DecodeError:
    """A :class:`DecodeError` naming the first five validation problems of a ``what`` event."""
    errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
    return DecodeError(f"invalid {what}: {errors}")


def decode(raw: bytes | None) -> AnyEvent:
    """Bytes from the bus to a typed event. Raises :class:`DecodeError` with a readable reason."""
    return decode_object(load_json(raw))


def decode_object(data: Any) -> AnyEvent:
    """A parsed JSON value to a typed event (what :func:`decode` does after ``orjson.loads``), for readers
    that look at a field before paying for validation. Raises :class:`DecodeError`."""
    data = check_envelope(data)
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        raise invalid(data.get("event_type", "event"), exc) from None


def decode_as(raw: bytes | None, kind: type[E]) -> E:
    event = decode(raw)
    if not isinstance(event, kind):
        raise DecodeError(f"expected {kind.__name__}, got {type(event).__name__}")
    return event


EVENT_TYPES: dict[str, type[BaseModel]] = {
    "chat.turn.request": ChatTurnRequest,
    "chat.turn.screened": ScreenedTurn,
    "chat.turn.grounded": GroundedTurn,
    "chat.token": TokenEvent,
    "chat.turn.completed": TurnCompleted,
    "chat.turn.cancel": CancelTurn,
    "chat.edge.heartbeat": EdgeHeartbeat,
    "kb.ingest": KbIngest,
    "kb.source": KbSource,
    "dead_letter": DeadLetter,
    "batch.created": BatchCreated,
    "batch.cancelled": BatchCancelled,
    "safety.review.item": ReviewItem,
    "safety.review.decision": ReviewDecision,
}
