"""OpenAI-compatible request and response shapes for ``POST /v1/chat/completions`` (the edge's and the batch
lane's contract; pure data, no HTTP).

Follows the OpenAI Chat Completions API (https://platform.openai.com/docs/api-reference/chat) as vLLM's
OpenAI server does: ``chat.completion`` for non-streaming, ``chat.completion.chunk`` events then
``data: [DONE]`` for streaming. Validation raises :class:`schemas.errors.InvalidRequest`; the edge renders
errors as ``{"error": {"message", "type", "param", "code"}}`` (:mod:`edge.errors`).
chatbus adds one field, ``citations`` (the knowledge-base sources of the answer), which OpenAI
clients ignore.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from schemas.errors import InvalidRequest
from schemas.events import ChatMessage, Citation, SamplingParams, ToolCall, ToolSpec, TurnCompleted, Usage


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> RequestMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Named(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _Named


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


def check_tools(tools: list[ToolSpec], tool_choice: str | NamedToolChoice | None) -> None:
    """Each tool's name unique and of OpenAI's form, its ``parameters`` a valid JSON Schema (checked against
    its draft's metaschema, :func:`jsonschema.validators.validator_for`), and a named ``tool_choice`` one of
    them. Raises :class:`InvalidRequest` naming the tool."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not TOOL_NAME.match(name):
            raise InvalidRequest(f"tools[{i}].function.name: {name!r} must be 1-64 letters, digits, '_' or '-'", param="tools")
        if name in seen:
            raise InvalidRequest(f"tools[{i}].function.name: {name!r} is given twice", param="tools")
        seen.add(name)
        schema = tool.function.parameters
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            at = f" at {where}" if where else ""
            raise InvalidRequest(f"tools[{i}].function.parameters is not a valid JSON Schema{at}: {exc.message}", param="tools") from None
        if schema and schema.get("type", "object") != "object":
            raise InvalidRequest(f"tools[{i}].function.parameters: must describe an object (type 'object')", param="tools")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in seen:
        raise InvalidRequest(f"tool_choice: no tool named {tool_choice.function.name!r} in tools", param="tool_choice")
    if tool_choice in ("required",) or isinstance(tool_choice, NamedToolChoice):
        if not tools:
            raise InvalidRequest("tool_choice: needs tools", param="tool_choice")


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's parameters chatbus honours; unknown parameters are ignored like vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[RequestMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=1)
    conversation_id: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    tools: list[ToolSpec] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # accepted by OpenAI but not implemented here: refused with a 400 rather than silently ignored
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @model_validator(mode="after")
    def _content(self) -> ChatCompletionRequest:
        if not any(m.role == "user" and m.text().strip() for m in self.messages):
            raise ValueError("messages must contain a non-empty user message")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        return [ChatMessage(role=m.role, content=m.text(), tool_calls=m.tool_calls or [], tool_call_id=m.tool_call_id) for m in self.messages]

    def offered_tools(self) -> tuple[list[ToolSpec], str]:
        """The tools the model sees and the choice: ``([], "auto")`` without tools or with
        ``tool_choice: "none"`` (the model is not told of them, so it answers in text); else the tools and
        ``"auto"``, ``"required"`` or the named function."""
        if not self.tools or self.tool_choice == "none":
            return [], "auto"
        if isinstance(self.tool_choice, NamedToolChoice):
            return list(self.tools), self.tool_choice.function.name
        return list(self.tools), self.tool_choice or "auto"

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=self.temperature,  # None: the model's default (SamplingParams)
            top_p=self.top_p,
            stop=list(self.stop or []),
            seed=self.seed,
        )


UNSUPPORTED = {
    "functions": "the legacy 'functions' parameter is not supported: use 'tools'",
    "logprobs": "logprobs are not supported by chatbus",
}


def check_supported(req: ChatCompletionRequest, max_model_len: int) -> None:
    """Refuse what chatbus would otherwise have to ignore silently (400, naming the parameter)."""
    for param, message in UNSUPPORTED.items():
        if getattr(req, param):
            raise InvalidRequest(message, param=param)
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise InvalidRequest("only response_format type 'text' is supported", param="response_format")
    check_tools(req.tools or [], req.tool_choice)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > max_model_len:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param} ({asked}) is larger than the model's context length ({max_model_len})", param=param)


def parse_request(payload: object) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises :class:`InvalidRequest` naming the offending parameter."""
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        # drop pydantic's union-branch tags ("str", "list[TextPart]", "function-after[…]") from the path
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p in {"str", "int", "float", "bool"} or "[" in p))]
        param = loc[0] if loc else None
        where = ".".join(loc)
        raise InvalidRequest(f"{where}: {err['msg']}" if where else err["msg"], param=param) from None


# --- responses ---------------------------------------------------------------------------------------


def usage_dict(u: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object, ``prompt_tokens_details.cached_tokens`` included."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def citations_list(cs: list[Citation]) -> list[dict[str, Any]]:
    return [c.model_dump() for c in cs]


def retraction_dict(done: TurnCompleted) -> dict[str, Any]:
    """The marker a retracted turn carries (``chatbus_retraction``, an extra field OpenAI clients ignore):
    the streamed text is withdrawn (``withdrawn_chars`` characters) and ``message`` replaces it. Never the
    withdrawn text itself."""
    r = done.retraction
    if r is None:
        return {}
    return {"chatbus_retraction": {"withdrawn": True, "withdrawn_chars": r.withdrawn_chars, "category": r.category, "message": done.text}}


def public_finish_reason(done: TurnCompleted) -> str:
    # "cancelled" is internal (the client asked to stop); OpenAI clients know "stop".
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason


class ChunkBuilder:
    """Builds the ``chat.completion.chunk`` objects of one streamed turn."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.id, self.model, self.include_usage = completion_id, model, include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    def role(self) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def content(self, text: str) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def tool_calls(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """The tool-call delta chunks of ``calls``: per call, one opening it (index, id, type, name, empty
        arguments) and one with its arguments — the shape the ``openai`` client accumulates by ``index``."""
        out: list[dict[str, Any]] = []
        for i, c in enumerate(calls):
            head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": ""}}
            for call in (head, {"index": i, "function": {"arguments": c.function.arguments}}):
                out.append(self._chunk([{"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}]))
        return out

    def finish(self, done: TurnCompleted) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": public_finish_reason(done)}],
            citations=citations_list(done.citations),
            **retraction_dict(done),
        )

    def usage(self, u: Usage) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [], "usage": usage_dict(u)}


def completion_body(completion_id: str, model: str, text: str, done: TurnCompleted) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if done.tool_calls:  # OpenAI's shape: content null when the answer is only calls
        message = {"role": "assistant", "content": text or None, "tool_calls": [c.model_dump() for c in done.tool_calls]}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(done.created_at),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": public_finish_reason(done)}],
        "usage": usage_dict(done.usage),
        "citations": citations_list(done.citations),
        **retraction_dict(done),
    }
