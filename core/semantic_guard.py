"""The semantic cache's guard: two questions whose embeddings are close may still ask opposite things.

MiniLM puts "Should I use tabs for indentation?" and "Should I not use tabs for indentation?" at cosine
0.99, and "How do I enable dark mode?" / "How do I disable dark mode?" far above most true paraphrases
(``bench/semantic_cache.py``: over its labelled near-miss pairs the similarity alone separates nothing
above 0.85). GPTCache's known false hits on negations, and LiteLLM's ``redis-semantic`` cache answering
unrelated queries alike, are this failure. :func:`conflict` names a difference that makes a cached answer
wrong for the new question, or None:

* ``negation``: one has a negation the other lacks (not, never, without, ``n't`` …);
* ``opposite``: a word of an antonym pair (enable/disable, add/remove, first/last …) in one, its opposite in
  the other;
* ``number``: the numbers differ (years, percentages, versions);
* ``direction``: the same words around a "to"/"from" the other way round (string to int / int to string);
* ``entity``: a name in one that the other lacks — a capitalised word past the first, a word with a digit,
  or a known language, tool or platform name (python/javascript, mysql/postgresql …).

It errs towards a miss: a paraphrase that swaps a name for a synonym is not served from the cache.
"""

from __future__ import annotations

import re

NEGATIONS = frozenset({"not", "no", "never", "without", "cannot", "none", "nor", "neither", "nothing", "nobody", "nowhere", "unable"})
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("enable", "disable"),
    ("on", "off"),
    ("add", "remove"),
    ("install", "uninstall"),
    ("start", "stop"),
    ("open", "close"),
    ("increase", "decrease"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("import", "export"),
    ("upload", "download"),
    ("before", "after"),
    ("min", "max"),
    ("minimum", "maximum"),
    ("first", "last"),
    ("true", "false"),
    ("allow", "deny"),
    ("allow", "block"),
    ("create", "delete"),
    ("push", "pull"),
    ("lock", "unlock"),
    ("connect", "disconnect"),
    ("show", "hide"),
    ("include", "exclude"),
    ("ascending", "descending"),
    ("upper", "lower"),
    ("uppercase", "lowercase"),
    ("buy", "sell"),
    ("more", "less"),
    ("best", "worst"),
    ("advantages", "disadvantages"),
    ("pros", "cons"),
    ("input", "output"),
    ("read", "write"),
    ("send", "receive"),
    ("server", "client"),
    ("left", "right"),
    ("inner", "outer"),
    ("public", "private"),
    ("sync", "async"),
    ("synchronous", "asynchronous"),
    ("compress", "decompress"),
    ("serialize", "deserialize"),
    ("mount", "unmount"),
    ("freeze", "unfreeze"),
)
NAMES = frozenset(
    "python javascript typescript java kotlin swift rust go golang ruby php perl scala haskell c c++ c# csharp bash zsh powershell "
    "sql mysql postgresql postgres sqlite mongodb redis kafka docker kubernetes linux windows macos mac ios android ubuntu debian "
    "git github gitlab aws s3 gcp azure react vue angular django flask fastapi node nodejs npm pip conda numpy pandas excel "
    "chrome firefox safari vim emacs vscode nginx apache".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z+#']*|\d+(?:[.,]\d+)*%?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*%?")
_DIRECTION = re.compile(r"\b(?:from\s+)?(?:an?\s+|the\s+)?([a-z]+)\s+(?:in)?to\s+(?:an?\s+|the\s+)?([a-z]+)", re.IGNORECASE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _negated(words: list[str]) -> bool:
    return any(w in NEGATIONS or w.endswith("n't") for w in words)


def _names(text: str) -> set[str]:
    raw = _WORD.findall(text)
    out = {w.lower() for w in raw if w.lower() in NAMES or any(ch.isdigit() for ch in w)}
    out |= {w.lower() for i, w in enumerate(raw) if i > 0 and w[0].isupper() and w.lower() not in ("i",)}
    return out


def conflict(new: str, cached: str) -> str | None:
    """Why a cached answer to ``cached`` would be wrong for ``new`` (see the module docstring), or None."""
    a, b = _words(new), _words(cached)
    if _negated(a) != _negated(b):
        return "negation"
    sa, sb = set(a), set(b)
    for x, y in ANTONYMS:
        if (x in sa and y in sb and y not in sa) or (y in sa and x in sb and x not in sa):
            return "opposite"
    if sorted(_NUMBER.findall(new)) != sorted(_NUMBER.findall(cached)):
        return "number"
    da, db = _DIRECTION.search(new), _DIRECTION.search(cached)
    if da and db and (da.group(1).lower(), da.group(2).lower()) == (db.group(2).lower(), db.group(1).lower()):
        return "direction"
    if _names(new) != _names(cached):
        return "entity"
    return None
