"""Chunking (retrieval_workers.chunking): structure, titles, anchors, URLs, bad files, BM25 terms."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_workers.chunking import SkipFile, Unchanged, chunk_text, document_chunks, html_blocks, lexical_text, markdown_blocks, read_document, split_text

# The shape of a Sphinx page of the Python docs: sections with ids, API entries as <dl class="py …">
SPHINX = """<html><head><title>wombat — Wombat Handling — Python 3.11 documentation</title></head><body>
<div class="related" role="navigation">prev | next</div>
<div class="body" role="main">
<section id="module-wombat">
<h1><code>wombat</code> — Wombat Handling<a class="headerlink" href="#module-wombat">¶</a></h1>
<p><strong>Source code:</strong> Lib/wombat.py</p>
<p>This module burrows. It is the reference for wombat handling in general and has a long introduction
that talks about burrows, cubes and the habits of marsupials at night.</p>
<section id="module-contents">
<h2>Module Contents<a class="headerlink" href="#module-contents">¶</a></h2>
<dl class="py function">
<dt class="sig sig-object py" id="wombat.dig"><span class="sig-prename">wombat.</span><span
class="sig-name">dig</span>(<em>depth</em>, <em>strict=False</em>)</dt>
<dd><p>Dig a burrow <em>depth</em> metres deep. With <em>strict</em> true, raise <code>BurrowError</code> on rock.</p></dd>
</dl>
<dl class="py class">
<dt class="sig sig-object py" id="wombat.Burrow"><span class="sig-prename">wombat.</span><span class="sig-name">Burrow</span>(<em>name</em>)</dt>
<dd><p>A burrow that wombats share with each other during the cold season.</p>
<dl class="py method">
<dt class="sig sig-object py" id="wombat.Burrow.extend"><span class="sig-name">extend</span>(<em>metres</em>)</dt>
<dd><p>Make the burrow longer by <em>metres</em>, cube by cube, until the wombat is satisfied.</p></dd>
</dl>
</dd>
</dl>
</section>
</section>
</div>
<div class="footer">© wombats</div>
<script>var x = "never indexed";</script>
</body></html>"""


def test_sphinx_sections_and_api_entries_become_titled_anchored_chunks(tmp_path: Path) -> None:
    root = tmp_path / "html"
    page = root / "library" / "wombat.html"
    page.parent.mkdir(parents=True)
    page.write_text(SPHINX)
    doc = read_document(page, root)
    assert doc.title == "wombat — Wombat Handling" and doc.rel_path == "library/wombat.html"
    chunks = document_chunks(doc, base_url="https://docs.python.org/3.11/")
    by_anchor = {c.anchor: c for c in chunks}
    assert set(by_anchor) == {"module-wombat", "wombat.dig", "wombat.Burrow", "wombat.Burrow.extend"}
    dig = by_anchor["wombat.dig"]
    assert dig.title == "wombat — Wombat Handling › wombat.dig"
    assert dig.heading_path == ("wombat — Wombat Handling", "Module Contents", "wombat.dig")
    assert dig.url == "https://docs.python.org/3.11/library/wombat.html#wombat.dig"
    assert dig.text.startswith("wombat.dig(depth, strict=False)") and "BurrowError" in dig.text
    assert dig.indexed_text.startswith("wombat — Wombat Handling › Module Contents › wombat.dig\n")
    # a class's method is a chunk of its own; the class's chunk keeps only the class's text
    assert "metres" in by_anchor["wombat.Burrow.extend"].text and "metres" not in by_anchor["wombat.Burrow"].text
    everything = " ".join(c.text for c in chunks)
    assert "never indexed" not in everything and "prev | next" not in everything and "¶" not in everything and "©" not in everything
    # without a base URL the link is the file itself
    assert document_chunks(doc)[1].url == f"{page}#wombat.dig"
    # ids are stable; a changed chunker or file changes the document hash
    assert [c.chunk_id for c in chunks] == [c.chunk_id for c in document_chunks(read_document(page, root), base_url="https://docs.python.org/3.11/")]
    with pytest.raises(Unchanged):
        read_document(page, root, known_hash=doc.doc_hash)
    page.write_text(SPHINX.replace("burrows.", "burrows deeply."))
    assert read_document(page, root).doc_hash != doc.doc_hash


def test_long_blocks_split_with_overlap_and_tiny_neighbours_merge() -> None:
    entries = "".join(f'<dl class="py data"><dt id="m.C{i}">m.C{i}</dt><dd><p>Constant {i}.</p></dd></dl>' for i in range(5))
    long_text = " ".join(f"Sentence {i} talks about topic {i}." for i in range(60))
    html = f'<div role="main"><section id="m"><h1>m</h1><p>{long_text}</p>{entries}</section></div>'
    title, blocks = html_blocks(html)
    assert title == "m" and len(blocks) == 6
    from retrieval_workers.chunking import Document

    chunks = document_chunks(Document("m.html", title, blocks, "h"), size=300, overlap=60)
    body = [c for c in chunks if c.anchor == "m"]
    assert len(body) > 3 and all(len(c.text) <= 300 for c in body)
    assert body[1].text[:15] in body[0].text  # the overlap
    merged = [c for c in chunks if c.anchor.startswith("m.C")]
    assert len(merged) == 1 and merged[0].anchor == "m.C0" and all(f"Constant {i}." in merged[0].text for i in range(5))


def test_markdown_follows_headings() -> None:
    title, blocks = markdown_blocks("# Guide\n\nIntro text here, long enough.\n\n## Install it\n\nRun pip install now please.\n\n```\n# not a heading\n```\n")
    assert title == "Guide"
    assert [(b.headings, b.anchor) for b in blocks] == [((), "guide"), (("Install it",), "install-it")]
    assert "# not a heading" in blocks[1].text


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.md", b"", "empty file"),
        ("blob.txt", b"abc\x00\x01\x02" * 100, "binary file"),
        ("latin.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e, enough words to make a text".encode("latin-1"), None),
        ("big.txt", b"word " * 3000, "too large"),
        ("noise.txt", bytes(range(1, 256)) * 8, "unreadable encoding"),
        ("notes.pdf", b"%PDF-1.4", "unsupported file type"),
        ("blank.md", b"   \n\n  ", "no text"),
    ],
)
def test_bad_files_are_skipped_with_a_reason(tmp_path: Path, name: str, content: bytes, reason: str | None) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    if reason is None:  # not UTF-8, but an encoding fits: read, not skipped
        text = read_document(f, max_bytes=10_000).blocks[0].text
        assert text.startswith("caf") and text.endswith("enough words to make a text") and "\ufffd" not in text
        return
    with pytest.raises(SkipFile, match=reason):
        read_document(f, max_bytes=10_000)


def test_split_text_and_plain_chunks() -> None:
    text = " ".join(f"Sentence {i} talks about topic {i}." for i in range(120))
    pieces = split_text(text, 300, 60)
    assert all(len(p) <= 300 for p in pieces) and len(pieces) > 5
    a, b = chunk_text(text, "doc.md", 300, 60), chunk_text(text, "doc.md", 300, 60)
    assert [c.chunk_id for c in a] == [c.chunk_id for c in b] and [c.position for c in a] == list(range(len(a)))
    with pytest.raises(ValueError):
        split_text(text, 100, 100)


def test_lexical_terms_split_identifiers_and_stem() -> None:
    terms = lexical_text("Writing files with os.path.join and __init__").split()
    assert {"write", "file", "os_path_join", "os", "path", "join", "init"} <= set(terms)
    assert lexical_text("wrote WRITES writing") == "wrote write write"
