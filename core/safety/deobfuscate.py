"""Undo the usual disguises of a request before it is screened: leetspeak, homoglyphs, spacing, base64.

:func:`variants` returns the readable forms of a message that differ from it — each is screened as well
as the message itself (the strictest verdict wins), so "h0w t0 m4ke a b0mb", "how to make a bоmb" (a
Cyrillic о), "b o m b" and a base64-encoded instruction meet the same screen as the plain text.

* **Homoglyphs**: NFKC (full-width and compatibility forms), then Cyrillic and Greek letters that look
  like Latin ones (Unicode's confusables for the basic Latin alphabet, the common subset) → Latin.
* **Leetspeak**: in words that mix letters with digits or symbols, ``0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g @→a $→s``
  — except identifiers: hex strings of 6 or more characters (hashes, ids) and tokens of 5 or more
  characters that are mostly digits (versions, codes), which turned into letters read as gibberish that
  the classifier can score as harmful.
* **Spacing**: runs of at least three single characters separated by spaces, dots, dashes or underscores
  (``b.o.m.b``) are joined.
* **Base64**: tokens of ≥ 16 base64 characters that decode to mostly printable UTF-8 text are decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x",
        "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y", "һ": "h",
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
        # Greek
        "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x", "υ": "u",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    }
)  # fmt: skip
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s", "!": "i", "|": "l"})
_LEET_WORD = re.compile(r"(?=\S*[A-Za-z])(?=\S*[0-9@$!|])[A-Za-z0-9@$!|]{2,}")
_SPACED = re.compile(r"\b(?:\w[ ._\-]){2,}\w\b")
_B64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")


def fold_homoglyphs(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_CONFUSABLES)


_HEX_ID = re.compile(r"[0-9A-Fa-f]{6,}")


def _identifier(token: str) -> bool:
    digits = sum(c.isdigit() for c in token)
    return bool(_HEX_ID.fullmatch(token)) or (len(token) >= 5 and digits * 2 > len(token))


def unleet(text: str) -> str:
    return _LEET_WORD.sub(lambda m: m.group(0) if _identifier(m.group(0)) else m.group(0).translate(_LEET), text)


def join_spaced(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        run = m.group(0)
        lead = ""
        if len(run) >= 9 and run[0].lower() in "ai" and run[1] == " ":  # "a b o m b": the article stays a word
            lead, run = run[:2], run[2:]
        return lead + re.sub(r"[ ._\-]", "", run)

    return _SPACED.sub(one, text)


def decode_base64(text: str) -> str:
    """``text`` with each base64 token that decodes to readable text replaced by that text."""

    def one(m: re.Match[str]) -> str:
        token = m.group(0)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
            decoded = raw.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return token
        printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
        return decoded if decoded and printable / len(decoded) > 0.95 and re.search(r"[A-Za-z]{3}", decoded) else token

    return _B64.sub(one, text)


def variants(text: str) -> list[str]:
    """The readable forms of ``text`` that differ from it (none for ordinary text), most decoded last."""
    out: list[str] = []
    current = text
    for step in (fold_homoglyphs, decode_base64, unleet, join_spaced):
        current = step(current)
        if current != text and current not in out:
            out.append(current)
    return out[-1:] if out else []
