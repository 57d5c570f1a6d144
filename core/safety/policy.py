"""The safety policy: a versioned YAML file of categories, each with deny patterns and exemplars.

File shape (the packaged default is ``core/safety/policy.yaml``)::

    version: "2026-11-21.1"          # required, non-empty; copied into every SafetyVerdict
    allow_margin: 0.08               # optional, default 0.08 (see "Semantics")
    allow_exemplars:                 # optional: ordinary requests that sit near a category's topic
      - "How does malware infect computers and how can I protect against it?"
    macros:                          # optional: name -> regex, used in patterns as {{name}}
      intent: '(?:how\\s+to\\s+|help\\s+me\\s+)'
    categories:                      # required, at least one; names match [a-z][a-z0-9_]*
      weapons:
        description: "..."           # optional, free text
        action: block                # block | flag
        patterns:                    # regexes, compiled case-insensitive; a string, or for
          - '\\bpipe\\s+bombs?\\b'      # flag categories {pattern: ..., weight: 0..1}
        exemplars:                   # short example requests, embedded for similarity
          - "How do I build a pipe bomb at home?"
        threshold: 0.60              # optional, cosine similarity in (0, 1]; default: the
                                     # screener's (Settings.safety_similarity_threshold)
        block_above: 0.95            # optional, flag categories only: block at/above this score
        refusal: "..."               # optional, the text a blocked turn gets back

Patterns are case-insensitive: they are searched in the normalised, lowercased message
(:func:`core.safety.screen.normalise`).

Semantics (applied by :class:`core.safety.screen.Screener`): a pattern hit in a ``block`` category
blocks with score 1.0; in a ``flag`` category the hits' weights combine as a noisy-OR
(``1 - prod(1 - w)``, default weight 0.5) into the category score. Exemplar similarity at or above the
category's threshold triggers the category's action, unless the message is about as close to one of
the top-level ``allow_exemplars`` (similarity to the best allow exemplar + ``allow_margin`` > the
category's similarity): a sentence embedding captures topic more than intent, so "how do antivirus
programs detect malware" sits as close to the malware exemplars as a real request does, and the allow
exemplars are what tell the two apart.

Errors: :func:`load_policy` raises :class:`PolicyError` (a ``ValueError``) naming the file, the category
and, for a bad regex, the pattern, e.g.
``policy.yaml: category 'weapons': pattern #3 '(?:bomb' does not compile: missing ), unterminated subpattern``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALLOW_MARGIN",
    "DEFAULT_FLAG_WEIGHT",
    "Category",
    "Pattern",
    "Policy",
    "PolicyError",
    "load_policy",
    "parse_policy",
]

DEFAULT_FLAG_WEIGHT = 0.5
DEFAULT_ALLOW_MARGIN = 0.08
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ESCAPE_RE = re.compile(r"\\.|\(\?P[<=>]")
_MACRO_RE = re.compile(r"\{\{\s*([a-z][a-z0-9_]*)\s*\}\}")
_TOP_KEYS = {"version", "description", "macros", "categories", "allow_exemplars", "allow_margin"}
_CATEGORY_KEYS = {"description", "action", "patterns", "exemplars", "threshold", "block_above", "refusal"}
_PATTERN_KEYS = {"pattern", "weight"}
Action = Literal["block", "flag"]


class PolicyError(ValueError):
    """The policy file is missing, not YAML, or not a valid policy; the message says where."""


@dataclass(frozen=True)
class Pattern:
    """One compiled deny pattern, to be searched in lowercased text. ``weight`` (0..1) only matters in
    ``flag`` categories."""

    regex: re.Pattern[str]
    weight: float = 1.0


@dataclass(frozen=True)
class Category:
    name: str
    action: Action
    patterns: tuple[Pattern, ...]
    exemplars: tuple[str, ...]
    threshold: float | None = None  # cosine similarity; None: the screener's default
    block_above: float | None = None  # flag categories: a score at/above this blocks
    refusal: str = ""
    description: str = ""


@dataclass(frozen=True)
class Policy:
    version: str
    categories: dict[str, Category]  # in file order
    allow_exemplars: tuple[str, ...] = ()
    allow_margin: float = DEFAULT_ALLOW_MARGIN  # cosine similarity units, 0..1
    source: str = ""  # where it was loaded from, for logs

    def category(self, name: str) -> Category | None:
        return self.categories.get(name)


def _fail(where: str, msg: str) -> PolicyError:
    return PolicyError(f"{where}: {msg}")


def _expand(raw: str, macros: dict[str, str], where: str) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in macros:
            raise _fail(where, f"unknown macro {{{{{name}}}}} (defined: {', '.join(sorted(macros)) or 'none'})")
        return f"(?:{macros[name]})"

    return _MACRO_RE.sub(repl, raw)


def _compile(raw: str, macros: dict[str, str], where: str) -> re.Pattern[str]:
    expanded = _expand(raw, macros, where)
    # The screener matches lowercased text, so an all-lowercase pattern needs no IGNORECASE (which
    # makes Python's re about 2.5x slower); one with capitals (outside escapes) keeps the flag.
    flags = re.IGNORECASE if any(c.isupper() for c in _ESCAPE_RE.sub("", expanded)) else 0
    try:
        regex = re.compile(expanded, flags)
    except re.error as exc:
        raise _fail(where, f"{raw!r} does not compile: {exc}") from None
    if regex.search("") is not None or regex.search(" ") is not None:
        raise _fail(where, f"{raw!r} matches empty text, so it would match every message")
    return regex


def _unit_float(value: Any, where: str, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise _fail(where, f"{field} must be a number in (0, 1], got {value!r}")
    return float(value)


def _parse_category(name: Any, body: Any, macros: dict[str, str], src: str) -> Category:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(src, f"category name {name!r} must match [a-z][a-z0-9_]*")
    where = f"{src}: category {name!r}"
    if not isinstance(body, dict):
        raise PolicyError(f"{where}: must be a mapping, got {type(body).__name__}")
    unknown = set(body) - _CATEGORY_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(map(str, unknown))} (allowed: {sorted(_CATEGORY_KEYS)})")
    action = body.get("action")
    if action not in ("block", "flag"):
        raise PolicyError(f"{where}: action must be 'block' or 'flag', got {action!r}")

    raw_patterns = body.get("patterns") or []
    if not isinstance(raw_patterns, list):
        raise PolicyError(f"{where}: patterns must be a list")
    patterns: list[Pattern] = []
    for i, item in enumerate(raw_patterns, 1):
        pwhere = f"{where}: pattern #{i}"
        weight = 1.0 if action == "block" else DEFAULT_FLAG_WEIGHT
        if isinstance(item, dict):
            unknown = set(item) - _PATTERN_KEYS
            if unknown or "pattern" not in item:
                got = sorted(map(str, item))
                raise PolicyError(f"{pwhere}: a mapping needs 'pattern' and may have 'weight', got {got}")
            if "weight" in item:
                if action == "block":
                    raise PolicyError(f"{pwhere}: weight only applies in flag categories (a block hit always blocks)")
                weight = _unit_float(item["weight"], pwhere, "weight")
            item = item["pattern"]
        if not isinstance(item, str) or not item.strip():
            raise PolicyError(f"{pwhere}: must be a non-empty string, got {item!r}")
        patterns.append(Pattern(_compile(item, macros, pwhere), weight))

    raw_exemplars = body.get("exemplars") or []
    if not isinstance(raw_exemplars, list) or not all(isinstance(e, str) and e.strip() for e in raw_exemplars):
        raise PolicyError(f"{where}: exemplars must be a list of non-empty strings")
    if not patterns and not raw_exemplars:
        raise PolicyError(f"{where}: needs at least one pattern or exemplar")

    threshold = body.get("threshold")
    if threshold is not None:
        threshold = _unit_float(threshold, where, "threshold")
    block_above = body.get("block_above")
    if block_above is not None:
        if action != "flag":
            raise PolicyError(f"{where}: block_above is only allowed with action 'flag'")
        block_above = _unit_float(block_above, where, "block_above")
    refusal = body.get("refusal") or ""
    description = body.get("description") or ""
    if not isinstance(refusal, str) or not isinstance(description, str):
        raise PolicyError(f"{where}: refusal and description must be strings")
    return Category(
        name=name,
        action=action,
        patterns=tuple(patterns),
        exemplars=tuple(e.strip() for e in raw_exemplars),
        threshold=threshold,
        block_above=block_above,
        refusal=refusal.strip(),
        description=description.strip(),
    )


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate already-parsed YAML (a mapping) into a :class:`Policy`; raises :class:`PolicyError`."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        got = sorted(map(str, unknown))
        raise PolicyError(f"{source}: unknown top-level keys {got} (allowed: {sorted(_TOP_KEYS)})")
    version = data.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError(f"{source}: version must be a non-empty string (quote it in YAML), got {version!r}")

    raw_macros = data.get("macros") or {}
    if not isinstance(raw_macros, dict):
        raise PolicyError(f"{source}: macros must be a mapping of name to regex")
    macros: dict[str, str] = {}
    for name, body in raw_macros.items():
        where = f"{source}: macro {name!r}"
        if not isinstance(name, str) or not _NAME_RE.match(name) or not isinstance(body, str) or not body:
            raise PolicyError(f"{where}: needs a [a-z][a-z0-9_]* name and a non-empty regex string")
        if _MACRO_RE.search(body):
            raise PolicyError(f"{where}: macros may not use other macros")
        try:
            re.compile(body)
        except re.error as exc:
            raise PolicyError(f"{where}: {body!r} does not compile: {exc}") from None
        macros[name] = body

    raw_categories = data.get("categories")
    if not isinstance(raw_categories, dict) or not raw_categories:
        raise PolicyError(f"{source}: categories must be a non-empty mapping")
    categories = {name: _parse_category(name, body, macros, source) for name, body in raw_categories.items()}

    raw_allow = data.get("allow_exemplars") or []
    if not isinstance(raw_allow, list) or not all(isinstance(e, str) and e.strip() for e in raw_allow):
        raise PolicyError(f"{source}: allow_exemplars must be a list of non-empty strings")
    margin = data.get("allow_margin", DEFAULT_ALLOW_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= float(margin) <= 1.0:
        raise PolicyError(f"{source}: allow_margin must be a number in [0, 1], got {margin!r}")
    return Policy(
        version=version.strip(),
        categories=categories,
        allow_exemplars=tuple(e.strip() for e in raw_allow),
        allow_margin=float(margin),
        source=source,
    )


def load_policy(path: Path | None = None) -> Policy:
    """Load and validate a policy file; ``None`` loads the packaged ``core/safety/policy.yaml``.

    Raises :class:`PolicyError` when the file is missing, is not YAML, or is not a valid policy.
    """
    if path is None:
        source = "core/safety/policy.yaml"
        text = resources.files("core.safety").joinpath("policy.yaml").read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    policy = parse_policy(data, source)
    log.info(
        "safety policy %s loaded from %s: %d categories, %d patterns, %d exemplars, %d allow exemplars",
        policy.version,
        source,
        len(policy.categories),
        sum(len(c.patterns) for c in policy.categories.values()),
        sum(len(c.exemplars) for c in policy.categories.values()),
        len(policy.allow_exemplars),
    )
    return policy
