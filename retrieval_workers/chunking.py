"""Document loading and chunking for the knowledge base.

Text, Markdown and HTML files become plain text (HTML through BeautifulSoup, dropping script, style
and navigation), then overlapping chunks of about ``size`` characters that prefer to break at paragraph,
then sentence, then word boundaries. Each chunk's id is the SHA-256 of its source and text (hex, first
32 chars), so ingesting the same file twice upserts the same rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bs4 import BeautifulSoup

SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".html", ".htm"}


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    text: str
    source: str
    position: int


def iter_files(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            yield p
        else:
            raise FileNotFoundError(p)


def load_text(path: Path) -> str:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in {".html", ".htm"}:
        soup = BeautifulSoup(raw, "html.parser")
        for tag in soup(["script", "style", "nav", "header", "footer"]):
            tag.decompose()
        for tag in soup.select("div.related, div.sphinxsidebar, div.footer"):
            tag.decompose()
        raw = soup.get_text()
    raw = re.sub(r"[ \t\u00a0]+", " ", raw)
    return re.sub(r"\n\s*\n+", "\n\n", raw).strip()


def _break_point(text: str, start: int, end: int) -> int:
    """The best place to end a chunk in text[start:end]: paragraph, sentence, then word boundary."""
    window = text[start:end]
    min_len = len(window) // 2
    for sep in ("\n\n", ". ", "\n", " "):
        i = window.rfind(sep)
        if i >= min_len:
            return start + i + len(sep)
    return end


def chunk_text(text: str, source: str, size: int = 800, overlap: int = 120) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``size`` chars, each starting ``overlap`` chars before the last ended."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than size")
    chunks: list[Chunk] = []
    start = 0
    while start < len(text):
        end = len(text) if len(text) - start <= size else _break_point(text, start, start + size)
        piece = text[start:end].strip()
        if len(piece) >= 20:
            digest = hashlib.sha256(f"{source}\0{piece}".encode()).hexdigest()[:32]
            chunks.append(Chunk(digest, piece, source, len(chunks)))
        if end >= len(text):
            break
        nxt = max(end - overlap, start + 1)
        space = text.find(" ", nxt, end)  # start the overlap on a word
        start = space + 1 if space != -1 else nxt
    return chunks
