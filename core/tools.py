"""Tool calls in generated text: found while the answer streams, parsed, and checked against the tools' schemas.

The format is Hermes' (NousResearch Hermes 2 Pro, adopted by Qwen2.5's chat template and parsed by vLLM's
``hermes`` tool parser)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, after any plain text. :class:`ToolCallStream` takes the text as it is generated and
releases only what is plain text: everything from the first ``<tool_call>`` on is held back, and so is a
tail that could be the start of one (as :class:`inference_workers.engines.base.StopMatcher` holds a
partial stop string), so no call's JSON ever reaches a client as content. :meth:`ToolCallStream.finish`
parses the held text into :class:`schemas.events.ToolCall` s.

Small models do not always use the tags: Qwen2.5-Coder-0.5B, given a system prompt of its own (the
retrieval stage's grounding), writes the same JSON in a Markdown ```json fence instead. So when the
answer *begins* with ``{`` or a backtick it is held whole, and at its end it is one call if it is exactly
one ``{"name": <an offered tool>, "arguments": {...}}`` object (fenced or bare), else released as text.

:func:`check_calls` validates each call: a tool of that name was offered, its arguments are a JSON object,
and they satisfy the tool's ``parameters`` schema (:mod:`jsonschema`, the schema's own draft). A call that
fails is an :class:`InvalidToolCall` naming the tool and the first violation (chatbus does not retry: the
client gets an error it can act on, see README "Tools").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable

import jsonschema

from schemas.events import FunctionCall, ToolCall, ToolSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
INVALID_TOOL_CALL = "invalid tool call: "  # how a turn's ``error`` starts when its call failed :func:`check_calls`


class InvalidToolCall(ValueError):
    """The model's tool call cannot be returned: unparsable, an unknown tool, or arguments its schema refuses."""


def new_call_id() -> str:
    """An id in OpenAI's form (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """Plain text out, tool calls held back (see the module docstring). ``prefix``: text the engine was
    made to start the answer with (a forced call, ``tool_choice`` required or named); it counts as generated."""

    def __init__(self, prefix: str = "", names: Iterable[str] = ()) -> None:
        self.released = ""  # plain text given out so far
        self._pending = ""  # not yet released: a possible start of OPEN, or everything from OPEN on
        self.calling = False  # OPEN was seen
        self.names = set(names)  # the offered tools (a bare JSON answer is a call only if it names one)
        self._bare: bool | None = None if self.names else False  # the answer began with "{" or "`" (None: not known yet)
        if prefix:
            self.feed(prefix)

    def feed(self, text: str) -> str:
        """The plain text that can be released now, of ``text`` appended to what was held back."""
        if self.calling or self._bare:
            self._pending += text
            return ""
        pending = self._pending + text
        if self._bare is None:
            head = pending.lstrip()
            if not head:
                self._pending = pending
                return ""
            self._bare = head[0] in "{`"
            if self._bare:
                self._pending = pending
                return ""
        at = pending.find(OPEN)
        if at >= 0:
            out, self._pending, self.calling = pending[:at], pending[at:], True
        else:
            keep = _partial_suffix(pending, OPEN)
            out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.released += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: the rest of the plain text, and the calls (empty when none was made).
        Raises :class:`InvalidToolCall` for a block that is not ``{"name": str, "arguments": object}`` JSON."""
        if not self.calling and OPEN in self._pending:  # held as a possible bare call, then tags after all
            self.calling = True
        if not self.calling:
            rest, self._pending = self._pending, ""
            bare = _bare_call(rest, self.names) if self._bare else None
            if bare is not None:
                return "", [bare]
            self.released += rest
            return rest, []
        preamble = self._pending.split(OPEN, 1)[0] if self._bare else ""  # released text came before OPEN otherwise
        calls: list[ToolCall] = []
        for block in self._pending.split(OPEN)[1:]:
            body = block.split(CLOSE, 1)[0].strip()  # an unclosed last block (max_tokens, a stop) is parsed as far as it goes
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as exc:
                raise InvalidToolCall(f"a tool call is not valid JSON ({exc.msg} at character {exc.pos}): {body[:200]!r}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise InvalidToolCall(f'a tool call must be {{"name": ..., "arguments": {{...}}}}: {body[:200]!r}')
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):  # some models emit the arguments already encoded
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    raise InvalidToolCall(f"the arguments of {obj['name']!r} are not JSON: {args[:200]!r}") from None
            if not isinstance(args, dict):
                raise InvalidToolCall(f"the arguments of {obj['name']!r} must be a JSON object, not {type(args).__name__}")
            calls.append(ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))))
        return preamble, calls


FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def _bare_call(text: str, names: set[str]) -> ToolCall | None:
    """``text`` as one call if it is exactly a ``{"name", "arguments"}`` object naming one of ``names``."""
    body = text.strip()
    fenced = FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not set(obj) <= {"name", "arguments", "parameters"}:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def check_calls(calls: list[ToolCall], tools: list[ToolSpec], tool_choice: str = "auto") -> None:
    """Raise :class:`InvalidToolCall` unless every call names an offered tool (the named one, for a named
    ``tool_choice``) and its arguments satisfy that tool's ``parameters`` JSON Schema."""
    by_name = {t.function.name: t for t in tools}
    for call in calls:
        tool = by_name.get(call.function.name)
        if tool is None:
            raise InvalidToolCall(f"the model called {call.function.name!r}, which is not one of the tools offered ({', '.join(by_name) or 'none'})")
        if tool_choice not in ("auto", "required") and call.function.name != tool_choice:
            raise InvalidToolCall(f"the model called {call.function.name!r}; tool_choice asked for {tool_choice!r}")
        schema = tool.function.parameters
        if not schema:
            continue
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(call.function.arguments)))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            at = f" at {where}" if where else ""
            raise InvalidToolCall(f"the arguments of {call.function.name!r} do not match its schema{at}: {error.message}")


def forced_prefix(tool_choice: str) -> str:
    """What the answer is made to start with so the model must call: for ``required`` the opening of a call,
    for a named function the opening up to its arguments (as vLLM forces a named call through guided
    decoding; here the engine continues the prefix). ``auto``: nothing."""
    if tool_choice == "auto":
        return ""
    if tool_choice == "required":
        return OPEN + '\n{"name": "'
    return OPEN + "\n" + json.dumps({"name": tool_choice})[:-1] + ', "arguments": '
