"""Retrieval quality over the whole Python 3.11 documentation: recall@1/5/10 and MRR per search mode.

No stack needed (milvus-lite in this process)::

    .venv/bin/python bench/retrieval_quality.py                 # both splits, every mode
    .venv/bin/python bench/retrieval_quality.py --split dev     # what tuning may look at

What it does
------------
* **Corpus**: the default knowledge base (``chatbus.commands.stack.default_corpus``: library, reference,
  tutorial, howto, faq, using, glossary of Debian's ``python3.11-doc``), chunked by the project's own
  :mod:`retrieval_workers.chunking` (Settings' sizes), each chunk's ``indexed_text`` embedded with the bulk
  embedder (``core.embeddings``, PyTorch all-MiniLM-L6-v2; its throughput in chunks/s is reported), upserted
  into the worker's own :class:`~retrieval_workers.store.KnowledgeBase` (dense + BM25), flushed. The Milvus
  file is kept under ``~/.cache/chatbus-bench/`` keyed by the chunker version, sizes and embedding settings
  (``--rebuild`` makes it again).
* **Questions**: ``bench/data/retrieval_questions.jsonl`` — written before any tuning, each with the page(s)
  that answer it; ``split`` dev (may be looked at while tuning) / test (never tuned on); ``kind`` single or
  followup (a follow-up with the earlier turns in ``history``).
* **Queries** are embedded with the per-turn query embedder (int8 ONNX, as the safety stage does).
* **Metrics** (page level): a hit at rank r is the first of the returned chunks whose page is one of the
  question's pages; recall@k = share of questions with a hit at r ≤ k; MRR = mean of 1/r over the top 10
  (0 without a hit). Modes: ``dense``, ``bm25``, ``hybrid`` (RRF, no page limit) and ``hybrid+page``
  (at most ``--per-page`` chunks per page), ``auto+page`` (the default: hybrid for identifiers and short
queries, else dense; :mod:`retrieval_workers.store`). Follow-ups: the auto+page mode with the raw last message and
  with :func:`retrieval_workers.query.standalone_query`.
* **Latency**: the search call per mode (ms p50/p99 over every query), at the full size.

Writes ``bench/results/retrieval_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chatbus.commands.stack import DOCS_BASE_URL, default_corpus, docs_root  # noqa: E402
from core.config import Settings  # noqa: E402
from core.embeddings import get_embedder  # noqa: E402
from retrieval_workers.chunking import CHUNKER_VERSION  # noqa: E402
from retrieval_workers.ingest import collect_chunks  # noqa: E402
from retrieval_workers.query import standalone_query  # noqa: E402
from retrieval_workers.store import KnowledgeBase  # noqa: E402
from schemas.events import ChatMessage, KbChunk  # noqa: E402

QUESTIONS = ROOT / "bench" / "data" / "retrieval_questions.jsonl"
RESULTS = ROOT / "bench" / "results"
CACHE = Path.home() / ".cache" / "chatbus-bench"
MODES = {"dense": ("dense", 0), "bm25": ("bm25", 0), "hybrid": ("hybrid", 0), "hybrid+page": ("hybrid", None), "auto+page": ("auto", None)}


def page_of(source: str) -> str:
    parts = Path(source).parts
    return "/".join(parts[parts.index("html") + 1 :]) if "html" in parts else Path(source).name


def build(settings: Settings, max_tokens: int, rebuild: bool) -> tuple[KnowledgeBase, dict[str, Any]]:
    paths = default_corpus()
    key = hashlib.sha256(f"{CHUNKER_VERSION}|{settings.chunk_chars}|{settings.chunk_overlap}|{max_tokens}|{[p.name for p in paths]}".encode()).hexdigest()[:16]
    folder = CACHE / f"kb-{key}"
    info_file = folder / "info.json"
    if folder.exists() and info_file.exists() and not rebuild:
        return KnowledgeBase(str(folder / "kb.db")), json.loads(info_file.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    chunks = collect_chunks(paths, settings, base_url=DOCS_BASE_URL, url_root=docs_root(settings))
    parse_s = time.perf_counter() - t0
    embedder = get_embedder(settings.embedding_model, settings.embedding_backend, bulk=True)
    if max_tokens and hasattr(embedder, "model"):  # not yet checked to take effect with sentence-transformers 6
        embedder.model.max_seq_length = max_tokens
    kb = KnowledgeBase(str(folder / "kb.db"))
    t0 = time.perf_counter()
    embed_s = 0.0
    for i in range(0, len(chunks), 512):
        batch = chunks[i : i + 512]
        e0 = time.perf_counter()
        vectors = embedder.encode([c.indexed_text for c in batch], batch_size=32)
        embed_s += time.perf_counter() - e0
        kb.upsert(
            [
                KbChunk(
                    chunk_id=c.chunk_id,
                    text=c.text,
                    source=c.source,
                    position=c.position,
                    embedding=v.tolist(),
                    title=c.title,
                    heading_path=list(c.heading_path),
                    anchor=c.anchor,
                    url=c.url,
                    doc_hash=c.doc_hash,
                )
                for c, v in zip(batch, vectors, strict=True)
            ]
        )
        print(f"\r{i + len(batch)}/{len(chunks)} chunks, {(i + len(batch)) / embed_s:.0f}/s embedding", end="", flush=True)
    kb.flush()
    print()
    info = {
        "chunks": len(chunks),
        "pages": len({c.source for c in chunks}),
        "parse_s": round(parse_s, 1),
        "embed_s": round(embed_s, 1),
        "embed_chunks_per_s": round(len(chunks) / embed_s, 1),
        "total_s": round(parse_s + time.perf_counter() - t0, 1),
        "max_tokens": max_tokens or "model default (256)",
        "embedder": type(embedder).__name__,
    }
    info_file.write_text(json.dumps(info))
    return kb, info


def rank_of(passages: list[Any], pages: set[str]) -> int:
    for r, p in enumerate(passages, 1):
        if page_of(p.source) in pages:
            return r
    return 0


def summarise(ranks: list[int]) -> dict[str, float]:
    n = len(ranks) or 1
    return {
        "n": len(ranks),
        "recall@1": round(sum(1 for r in ranks if 0 < r <= 1) / n, 3),
        "recall@5": round(sum(1 for r in ranks if 0 < r <= 5) / n, 3),
        "recall@10": round(sum(1 for r in ranks if 0 < r <= 10) / n, 3),
        "mrr": round(sum(1 / r for r in ranks if r) / n, 3),
    }


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--split", choices=["dev", "test", "all"], default="all")
    ap.add_argument("--per-page", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=0, help="truncate documents to this many tokens when embedding (0: the model's 256)")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default="retrieval_quality")
    args = ap.parse_args()
    settings = Settings()
    kb, info = build(settings, args.max_tokens, args.rebuild)
    print(json.dumps(info))
    items = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    query_embedder = get_embedder(settings.embedding_model, settings.embedding_backend)
    results: dict[str, Any] = {"corpus": info, "per_page": args.per_page, "splits": {}}
    latency: dict[str, list[float]] = {m: [] for m in MODES}
    splits = ["dev", "test"] if args.split == "all" else [args.split]
    for split in splits:
        singles = [q for q in items if q["split"] == split and q["kind"] == "single"]
        follows = [q for q in items if q["split"] == split and q["kind"] == "followup"]
        out: dict[str, Any] = {}
        vecs = query_embedder.encode([q["question"] for q in singles]).tolist()
        for name, (mode, per_page) in MODES.items():
            ranks = []
            for q, v in zip(singles, vecs, strict=True):
                t0 = time.perf_counter()
                ps = kb.search(
                    v,
                    10,
                    -1.0,
                    query=q["question"],
                    mode=mode,
                    per_page=args.per_page if per_page is None else per_page,
                    candidates=settings.retrieval_candidates,
                )  # type: ignore[arg-type]
                latency[name].append((time.perf_counter() - t0) * 1000)
                ranks.append(rank_of(ps, set(q["pages"])))
            out[name] = summarise(ranks)
            out[name]["misses"] = [q["id"] for q, r in zip(singles, ranks, strict=True) if r == 0 or r > 5]
        for label, rewrite in (("followup raw", False), ("followup rewritten", True)):
            ranks = []
            for q in follows:
                messages = [ChatMessage(role=m["role"], content=m["content"]) for m in q["history"]] + [ChatMessage(role="user", content=q["question"])]
                text = standalone_query(messages)[0] if rewrite else q["question"]
                v = query_embedder.encode([text])[0].tolist()
                ps = kb.search(v, 10, -1.0, query=text, mode="auto", per_page=args.per_page, candidates=settings.retrieval_candidates)
                ranks.append(rank_of(ps, set(q["pages"])))
            out[label] = summarise(ranks)
        results["splits"][split] = out
    results["latency_ms"] = {m: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "n": len(v)} for m, v in latency.items() if v}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Corpus: {info['chunks']:,} chunks from {info['pages']} pages; embedding {info['embed_chunks_per_s']} chunks/s "
        f"({info['embedder']}, max tokens {info['max_tokens']}), whole build {info['total_s']} s.",
        "",
        "| split | mode | n | recall@1 | recall@5 | recall@10 | MRR |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, out in results["splits"].items():
        for name, m in out.items():
            lines.append(f"| {split} | {name} | {m['n']} | {m['recall@1']} | {m['recall@5']} | {m['recall@10']} | {m['mrr']} |")
    lines += ["", "| search | p50 ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {m} | {v['p50']} | {v['p99']} |" for m, v in results["latency_ms"].items()]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("misses (dev):", {k: v.get("misses") for k, v in results["splits"].get("dev", {}).items() if "misses" in v})


if __name__ == "__main__":
    main()
