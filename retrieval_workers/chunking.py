"""Documents into chunks that follow their structure, each carrying its title, heading path, anchor and URL.

* **Sphinx HTML** (the Python documentation): the page's main body is walked section by section
  (``<section id=…>`` with its heading) and API entry by API entry (``<dl class="py function">`` whose
  ``<dt id="csv.reader">`` names the anchor; also ``std`` entries such as command-line options). Each
  section or entry is one block of text; a class's methods are blocks of their own. Long blocks are split
  with overlap (:func:`chunk_text`), tiny neighbours under the same parent are merged (the first one's
  anchor names the merged chunk).
* **Markdown**: blocks along ``#`` headings, anchors as GitHub slugs.
* **Plain text / reStructuredText / other HTML**: one block.

Every chunk has a ``title`` (``"csv — CSV File Reading and Writing › csv.reader"``: the page title and the
innermost heading or entry), a ``heading_path`` (every heading from the page title down), an ``anchor`` and a
``url``: ``base_url + path relative to the ingest root + "#" + anchor`` when a base URL is given (the Python
docs: ``https://docs.python.org/3.11/``), else the file path (plus ``#anchor``). :attr:`Chunk.indexed_text`
(heading path, then the body) is what is embedded and indexed for BM25; ``text`` (the body) is what the prompt
and the snippet show.

A ``chunk_id`` is the SHA-256 (hex, 32 chars) of the source, position and text, so ingesting the same file
twice upserts the same rows; ``doc_hash`` is the SHA-256 of the file's bytes and of :data:`CHUNKER_VERSION`
with the chunk sizes, so a changed file, or a changed chunker, re-indexes the document.

Bad input never stops a run: :func:`read_document` raises :class:`SkipFile` with the reason (empty, binary,
too large, unreadable encoding, unsupported type, no text), which :mod:`retrieval_workers.ingest` reports.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bs4 import BeautifulSoup, Tag
from bs4.element import NavigableString

SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".html", ".htm"}
CHUNKER_VERSION = "2"
SEP = " › "
MIN_CHUNK = 20  # characters: shorter pieces are dropped
MERGE_BELOW = 100  # characters: neighbouring blocks this small under one heading are merged (one-line constants)
_DROP_TAGS = ("script", "style", "nav", "header", "footer", "noscript")
_DROP_SELECTORS = "div.related, div.sphinxsidebar, div.footer, a.headerlink, div.clearer"
_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")


class SkipFile(Exception):
    """A file that is not ingested; ``str(exc)`` is the reason."""


class Unchanged(Exception):
    """The file's ``doc_hash`` is the one already indexed (raised before any parsing)."""


@dataclass(frozen=True)
class Block:
    """One section or API entry of a document: its heading path below the page title, anchor and text."""

    headings: tuple[str, ...]
    anchor: str
    text: str


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    text: str
    source: str
    position: int
    title: str = ""
    heading_path: tuple[str, ...] = field(default_factory=tuple)
    anchor: str = ""
    url: str = ""
    doc_hash: str = ""

    @property
    def indexed_text(self) -> str:
        """What is embedded and indexed: the heading path (page title first), then the body."""
        head = SEP.join(self.heading_path)
        return f"{head}\n{self.text}" if head else self.text


@dataclass(frozen=True)
class Document:
    source: str
    title: str
    blocks: list[Block]
    doc_hash: str
    rel_path: str = ""  # path relative to the ingest root (for URLs)


def iter_files(paths: list[Path]) -> Iterator[tuple[Path, Path]]:
    """``(file, root)`` for every file named or under a directory named (known suffixes only in directories);
    ``root`` is the directory given (the file's parent for a file given by name). Raises ``FileNotFoundError``."""
    for p in paths:
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES):
                yield f, p
        elif p.is_file():
            yield p, p.parent
        else:
            raise FileNotFoundError(p)


def _clean(text: str) -> str:
    text = re.sub(r"[ \t\u00a0\u200b]+", " ", text.replace("¶", ""))
    text = re.sub(r" *\n[ \n]*\n *", "\n\n", text)
    return re.sub(r" *\n *", "\n", text).strip()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(raw).best()
    if best is None or best.chaos > 0.2:
        raise SkipFile("unreadable encoding (not UTF-8, and no other encoding fits)")
    return str(best)


def read_document(
    path: Path, root: Path | None = None, *, max_bytes: int = 20_000_000, size: int = 800, overlap: int = 120, known_hash: str | None = None
) -> Document:
    """The blocks of one file. Raises :class:`SkipFile` (with the reason) for a file that cannot be ingested,
    :class:`Unchanged` when its hash is ``known_hash``."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SkipFile(f"unsupported file type {suffix or '(none)'!r} (supported: {', '.join(sorted(SUFFIXES))})")
    try:
        n = path.stat().st_size
        if n == 0:
            raise SkipFile("empty file")
        if n > max_bytes:
            raise SkipFile(f"too large ({n:,} bytes > {max_bytes:,}; CHATBUS_INGEST_MAX_BYTES)")
        raw = path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"unreadable: {exc.strerror or exc}") from exc
    doc_hash = hashlib.sha256(raw + f"\0{CHUNKER_VERSION}\0{size}\0{overlap}".encode()).hexdigest()
    if doc_hash == known_hash:
        raise Unchanged(str(path))
    if b"\x00" in raw[:8192]:
        raise SkipFile("binary file (NUL bytes)")
    text = _decode(raw)
    rel = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else path.name
    if suffix in {".html", ".htm"}:
        title, blocks = html_blocks(text)
    elif suffix in {".md", ".markdown"}:
        title, blocks = markdown_blocks(text)
    else:
        title, blocks = "", [Block((), "", _clean(text))]
    blocks = [b for b in blocks if len(b.text) >= MIN_CHUNK]
    if not blocks:
        raise SkipFile("no text")
    return Document(str(path), title or path.stem, blocks, doc_hash, rel)


# --- Sphinx / HTML -------------------------------------------------------------------------------------------


def _heading_text(tag: Tag) -> str:
    return _clean(tag.get_text(" ")).replace("\n", " ")


def _is_entry(tag: Tag) -> bool:
    """An API or ``std`` description list whose terms carry ids (``<dl class="py function">``)."""
    if tag.name != "dl":
        return False
    classes: list[str] = list(tag.get("class") or [])
    return ("py" in classes or "std" in classes or "describe" in classes) and any(
        isinstance(dt, Tag) and dt.get("id") for dt in tag.find_all("dt", recursive=False)
    )


def _is_section(tag: Tag) -> bool:
    return tag.name == "section" or (tag.name == "div" and "section" in (tag.get("class") or []) and bool(tag.get("id")))


def _structural(tag: Tag) -> bool:
    return _is_section(tag) or _is_entry(tag)


class _Walker:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    def walk(self, node: Tag, path: tuple[str, ...], anchor: str, lead: str = "") -> None:
        buf: list[str] = [lead] if lead else []

        def flush() -> None:
            text = _clean("\n".join(buf))
            if text:
                self.blocks.append(Block(path, anchor, text))
            buf.clear()

        for child in node.children:
            if isinstance(child, NavigableString):
                if child.strip() and type(child) is NavigableString:
                    buf.append(str(child))
                continue
            if not isinstance(child, Tag):
                continue
            if _is_section(child):
                flush()
                heading = child.find(_HEADINGS)
                title = _heading_text(heading) if isinstance(heading, Tag) else ""
                if isinstance(heading, Tag):
                    heading.extract()
                self.walk(child, (*path, title) if title else path, str(child.get("id") or anchor))
            elif _is_entry(child):
                flush()
                self.entry(child, path, anchor)
            elif child.name in _HEADINGS:
                continue  # a section's heading is in the path already
            elif child.find(_structural) is not None:
                flush()
                self.walk(child, path, anchor)
            else:
                buf.append(child.get_text())
        flush()

    def entry(self, dl: Tag, path: tuple[str, ...], anchor: str) -> None:
        terms = [dt for dt in dl.find_all("dt", recursive=False) if isinstance(dt, Tag)]
        ids = [str(dt.get("id")) for dt in terms if dt.get("id")]
        name = ids[0] if ids else anchor
        signature = "\n".join(_clean(dt.get_text()).replace("\n", " ") for dt in terms)
        for dd in dl.find_all("dd", recursive=False):
            if isinstance(dd, Tag):
                self.walk(dd, (*path, name), name, lead=signature)
                signature = ""
        if signature:  # an entry without a description
            self.blocks.append(Block((*path, name), name, signature))


def html_blocks(html: str) -> tuple[str, list[Block]]:
    """``(page title, blocks)`` of an HTML page (Sphinx's structure when present)."""
    try:
        soup = BeautifulSoup(html, "lxml")
    except Exception:  # lxml not installed: the slower pure-Python parser
        soup = BeautifulSoup(html, "html.parser")
    for tag in soup(_DROP_TAGS):
        tag.decompose()
    for tag in soup.select(_DROP_SELECTORS):
        tag.decompose()
    body = soup.select_one('div[role="main"]') or soup.select_one("div.body") or soup.body or soup
    h1 = body.find("h1")
    title = _heading_text(h1) if isinstance(h1, Tag) else ""
    if not title and soup.title is not None:
        title = _clean(soup.title.get_text()).split(" — Python")[0]
    walker = _Walker()
    walker.walk(body, (), "")
    # the page's top section carries the h1 as its first heading: drop it (the title is the first heading)
    blocks = [replace(b, headings=b.headings[1:]) if b.headings and b.headings[0] == title else b for b in walker.blocks]
    return title, blocks


# --- Markdown ------------------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-")


def markdown_blocks(text: str) -> tuple[str, list[Block]]:
    title = ""
    stack: list[tuple[int, str]] = []
    blocks: list[Block] = []
    buf: list[str] = []
    anchor = ""
    fence = False

    def flush() -> None:
        body = _clean("\n".join(buf))
        if body:
            blocks.append(Block(tuple(h for _, h in stack[1:] if title) if title else tuple(h for _, h in stack), anchor, body))
        buf.clear()

    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if m is None:
            buf.append(line)
            continue
        flush()
        level, heading = len(m.group(1)), m.group(2).strip()
        if not title and level == 1:
            title = heading
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        anchor = _slug(heading)
    flush()
    return title, blocks


# --- chunks --------------------------------------------------------------------------------------------------


def _break_point(text: str, start: int, end: int) -> int:
    """The best place to end a chunk in text[start:end]: paragraph, sentence, then word boundary."""
    window = text[start:end]
    min_len = len(window) // 2
    for sep in ("\n\n", ". ", "\n", " "):
        i = window.rfind(sep)
        if i >= min_len:
            return start + i + len(sep)
    return end


def split_text(text: str, size: int = 800, overlap: int = 120) -> list[str]:
    """``text`` in pieces of at most ``size`` chars, each starting about ``overlap`` chars before the last ended."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = len(text) if len(text) - start <= size else _break_point(text, start, start + size)
        piece = text[start:end].strip()
        if len(piece) >= MIN_CHUNK:
            pieces.append(piece)
        if end >= len(text):
            break
        nxt = max(end - overlap, start + 1)
        space = text.find(" ", nxt, end)  # start the overlap on a word
        start = space + 1 if space != -1 else nxt
    return pieces


def _merge_small(blocks: list[Block], size: int, small: int) -> list[Block]:
    """Merge runs of neighbouring blocks under the same parent heading while each is under ``small`` chars
    and the result stays within ``size``."""
    out: list[Block] = []
    for b in blocks:
        prev = out[-1] if out else None
        if (
            prev is not None
            and len(prev.text) < small
            and len(b.text) < small
            and prev.headings[:-1] == b.headings[:-1]
            and len(prev.text) + len(b.text) + 1 <= size
        ):
            out[-1] = Block(prev.headings, prev.anchor, f"{prev.text}\n{b.text}")
        else:
            out.append(b)
    return out


def document_chunks(doc: Document, *, size: int = 800, overlap: int = 120, base_url: str = "") -> list[Chunk]:
    """The chunks of ``doc``: its blocks merged when tiny, split with overlap when long."""
    chunks: list[Chunk] = []
    for block in _merge_small(doc.blocks, size, small=MERGE_BELOW):
        path = (doc.title, *block.headings) if doc.title else block.headings
        title = SEP.join([doc.title, block.headings[-1]]) if doc.title and block.headings else doc.title or SEP.join(block.headings)
        if base_url:
            url = base_url.rstrip("/") + "/" + doc.rel_path + (f"#{block.anchor}" if block.anchor else "")
        else:
            url = doc.source + (f"#{block.anchor}" if block.anchor else "")
        for piece in split_text(block.text, size, overlap):
            position = len(chunks)
            digest = hashlib.sha256(f"{doc.source}\0{position}\0{piece}".encode()).hexdigest()[:32]
            chunks.append(Chunk(digest, piece, doc.source, position, title, path, block.anchor, url, doc.doc_hash))
    return chunks


def chunk_text(text: str, source: str, size: int = 800, overlap: int = 120) -> list[Chunk]:
    """Plain ``text`` as chunks of one untitled block (what the structured path does for a ``.txt`` file)."""
    doc = Document(source, "", [Block((), "", text)], hashlib.sha256(text.encode()).hexdigest())
    return document_chunks(doc, size=size, overlap=overlap)


def lexical_text(text: str, stemmer: Any | None = None) -> str:
    """``text`` as BM25 terms: identifiers split at ``.`` and ``_`` (``os.path.join`` → ``os path join``, kept
    whole too), lower case, each word stemmed with Snowball's English stemmer (``writing`` → ``write``)."""
    stem = stemmer or _stemmer()
    words = re.findall(r"[A-Za-z0-9]+(?:[._][A-Za-z0-9]+)*", text)
    out: list[str] = []
    for w in words:
        low = w.lower()
        parts = re.split(r"[._]+", low)
        if len(parts) > 1:
            out.append(low.replace(".", "_"))  # the whole dotted name as one term
        out.extend(stem.stemWord(p) for p in parts if p)
    return " ".join(out)


_STEMMER: Any = None


def _stemmer() -> Any:
    global _STEMMER
    if _STEMMER is None:
        import snowballstemmer

        _STEMMER = snowballstemmer.stemmer("english")
    return _STEMMER
