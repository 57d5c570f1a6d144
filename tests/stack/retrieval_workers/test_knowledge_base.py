"""The knowledge base through the real stack: ingest over kb.ingest, the kb.sources catalogue, citations.

Real pages of the Python documentation (Debian's python3.11-doc, unpacked by `make setup`) go in through
the ingest client, the bus and the retrieval worker's milvus-lite; questions go through the edge. The model
is the tiny random one: the tests read citations, not answers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from chatbus.commands.stack import DOCS_BASE_URL, docs_root
from chatbus.stack import Stack
from core.config import ROOT, Settings
from producers.ingest import read_sources
from retrieval_workers.ingest import delete, ingest
from schemas.events import DeadLetter
from tests.conftest import eventually, read_topic

pytestmark = pytest.mark.stack

MODEL = "chatbus-tiny-random"
PAGES = ("textwrap", "shlex", "bisect", "heapq")


@pytest.fixture(scope="module")
def html_root(settings: Settings) -> Path:
    root = docs_root(settings)
    if root is None:
        pytest.fail("the Python documentation is not unpacked: run `make setup` (make docs-corpus)")
    return root


async def ask(edge_url: str, question: str, history: list[dict[str, str]] | None = None) -> list[dict[str, object]]:
    client = openai.AsyncOpenAI(base_url=f"{edge_url}/v1", api_key="unused", max_retries=0, timeout=120)
    resp = await client.chat.completions.create(model=MODEL, messages=[*(history or []), {"role": "user", "content": question}], max_tokens=4)
    return list((resp.model_extra or {}).get("citations") or [])


async def test_documentation_pages_are_cited_by_title_and_docs_url(edge_url: str, settings: Settings, html_root: Path) -> None:
    paths = [html_root / "library" / f"{p}.html" for p in PAGES]
    report = await ingest(paths, settings, wait=True, progress=False, base_url=DOCS_BASE_URL, url_root=html_root)
    assert report.ingested + report.unchanged == len(PAGES) and not report.skipped
    catalogue = await read_sources(settings)
    textwrap = catalogue[str(paths[0])]
    assert textwrap.title == "textwrap — Text wrapping and filling" and textwrap.chunks > 5
    assert textwrap.url == f"{DOCS_BASE_URL}library/textwrap.html"

    citations = await ask(edge_url, "How do I break a long paragraph into lines of at most 40 characters?")
    assert citations, "the question is about an ingested page"
    top = citations[0]
    assert str(top["url"]).startswith(f"{DOCS_BASE_URL}library/textwrap.html#"), citations
    assert str(top["title"]).startswith("textwrap — Text wrapping and filling"), citations
    assert top["snippet"] and top["source"] == str(paths[0])
    # at most two chunks of one page among the citations (CHATBUS_RETRIEVAL_PER_PAGE)
    per_page: dict[str, int] = {}
    for c in citations:
        per_page[str(c["source"])] = per_page.get(str(c["source"]), 0) + 1
    assert max(per_page.values()) <= settings.retrieval_per_page

    # a follow-up is searched with the question before it
    follow = await ask(edge_url, "and what about a priority queue?", [{"role": "user", "content": "How do I keep a list sorted while inserting?"}])
    assert any(str(c["url"]).startswith(f"{DOCS_BASE_URL}library/heapq.html") for c in follow), follow

    # re-ingesting unchanged pages embeds nothing
    again = await ingest(paths, settings, wait=True, progress=False, base_url=DOCS_BASE_URL, url_root=html_root)
    assert (again.unchanged, again.ingested, again.chunks) == (len(PAGES), 0, 0)


async def test_a_changed_file_replaces_its_chunks_and_delete_removes_them(edge_url: str, settings: Settings, tmp_path: Path) -> None:
    doc = tmp_path / "axolotl.md"
    doc.write_text("# Axolotl tuning\n\n" + "\n\n".join(f"## Knob {i}\n\nThe axolotl knob {i} sets the gill pressure to {i} pascal. " * 3 for i in range(6)))
    first = await ingest([doc], settings, wait=True, progress=False)
    assert first.ingested == 1 and first.chunks >= 6
    assert (await read_sources(settings))[str(doc)].chunks == first.chunks
    doc.write_text("# Axolotl tuning\n\nOnly one knob is left: the axolotl gill pressure is always 7 pascal.\n")
    second = await ingest([doc], settings, wait=True, progress=False)
    assert second.ingested == 1 and second.chunks == 1
    entry = (await read_sources(settings))[str(doc)]
    assert entry.chunks == 1, "the old version's chunks were deleted"  # counted in Milvus after the delete
    citations = await ask(edge_url, "What gill pressure does the axolotl knob set?")
    cited = [c for c in citations if c["source"] == str(doc)]
    assert len(cited) == 1 and "always 7 pascal" in str(cited[0]["snippet"]), citations

    await delete(str(doc), settings)
    assert str(doc) not in await read_sources(settings)
    assert not [c for c in await ask(edge_url, "What gill pressure does the axolotl knob set?") if c["source"] == str(doc)]


async def test_bad_files_are_skipped_with_reasons_and_the_rest_goes_on(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "good.md").write_text("# Capybara\n\nCapybaras are the largest rodents and like warm water.\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    (tmp_path / "noise.txt").write_bytes(bytes(range(1, 256)) * 8)
    report = await ingest([tmp_path], settings, wait=True, progress=False)
    reasons = {Path(p).name: r for p, r in report.skipped}
    assert report.ingested == 1 and set(reasons) == {"empty.txt", "image.html", "noise.txt"}, report.summary()
    assert reasons["empty.txt"] == "empty file" and reasons["image.html"].startswith("binary") and reasons["noise.txt"].startswith("unreadable encoding")
    assert "skipped" in report.summary() and "empty file" in report.summary()


async def test_poison_kb_ingest_goes_to_the_dead_letter_topic(settings: Settings, stack: Stack) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        bad = {"event_type": "kb.ingest", "chunks": [{"chunk_id": "x", "text": "t", "source": "s", "position": "not a number", "embedding": []}]}
        await producer.send_and_wait(f"{settings.topic_prefix}kb.ingest", orjson.dumps(bad), key=b"poison-source")
        await producer.send_and_wait(f"{settings.topic_prefix}kb.ingest", orjson.dumps({"event_type": "kb.ingest", "op": "delete"}), key=b"poison-delete")
    finally:
        await producer.stop()

    async def letters() -> list[DeadLetter] | None:
        found = [d for d in await read_topic(settings, "chat.dlq") if isinstance(d, DeadLetter) and d.key in ("poison-source", "poison-delete")]
        return found if len(found) == 2 else None

    found = await eventually(letters, what="both poison kb.ingest messages dead-lettered")
    assert all(d.source_topic.endswith("kb.ingest") and d.reason for d in found)
    # the worker goes on: a good document is still indexed afterwards
    doc = Path(settings.state_dir) / "after-poison.md"
    doc.write_text("# Okapi\n\nThe okapi is a giraffid that lives in the Ituri rainforest.\n")
    assert (await ingest([doc], settings, wait=True, progress=False)).ingested == 1


def test_kb_commands_list_stats_and_delete(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    def chatbus(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "chatbus.cli", *args], cwd=ROOT, env=stack.env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    doc = tmp_path / "pangolin.md"
    doc.write_text("# Pangolin scales\n\nPangolin scales are made of keratin, like human nails.\n")
    assert "1 ingested" in chatbus("ingest", str(doc), "--base-url", "https://example.org/notes/")
    listed = chatbus("kb", "list")
    assert str(doc) in listed and "Pangolin scales" in listed
    listed_json = [orjson.loads(line) for line in chatbus("kb", "list", "--json").splitlines()]
    mine = [d for d in listed_json if d["source"] == str(doc)]
    assert mine and mine[0]["url"] == "https://example.org/notes/pangolin.md" and mine[0]["chunks"] == 1
    assert "documents" in chatbus("kb", "stats")
    assert "deleted" in chatbus("kb", "delete", str(doc))
    assert str(doc) not in chatbus("kb", "list")
