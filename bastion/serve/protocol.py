"""OpenAI-compatible request and response shapes (the subset Bastion serves).

Requests are strict: an unknown field is a 400 naming it (a client that sends
`logit_bias` must learn it had no effect, not get silently different output), and every
number is bounded here before the engine checks it against the model's limits.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

from bastion.infer.generate import MAX_STOP_CHARS
from bastion.tokenizer.tools import MAX_TOOLS

MAX_STOP_STRINGS = 16  # hard schema cap; GenerateConfig.max_stop_strings is the configured one
MAX_PROMPT_CHARS = 4_000_000
MAX_MESSAGES = 1024
MAX_PROMPTS = 128  # hard schema cap; ServeConfig.max_prompts is the configured one
MAX_TOP_LOGPROBS = 20  # hard schema cap (OpenAI's chat limit); ServeConfig.max_logprobs is the configured one
MAX_PROMPT_IDS = 1_048_576  # token ids in one prompt; the model's context is checked later
TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]  # StrictInt: no "12" or 1.0 or true
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]
MAX_LOGIT_BIAS = 1024  # hard schema cap; ServeConfig.max_logit_bias is the configured one


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable_text(body: Any) -> tuple[str, str] | None:
    """The first string of a parsed JSON body, value or field name, that is not valid
    Unicode: (field, what it is), or None. JSON's `\\ud800` escapes (and CESU-8 bytes, which
    Python's JSON reader lets through) make lone surrogates, which no tokenizer, log line or
    response can encode. Walked with a stack: the body's depth is the client's choice."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str) and not _encodable(node):
            return path or "body", "text"
        if isinstance(node, dict):
            for key, value in node.items():
                if not _encodable(key):
                    return path or "body", "a field name"
                stack.append((f"{path}.{key}" if path else key, value))
        elif isinstance(node, list):
            stack.extend((f"{path}.{i}", value) for i, value in enumerate(node))
    return None


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality without Python's True == 1 and 0 == False (0 and 0.0 are both zero)."""
    if neutral is None or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and value == neutral


def printable(text: str) -> str:
    """`text` made encodable (a lone surrogate shows as its escape), for any reply that quotes a client."""
    return text if _encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    # Logit adjustments (generate.sampling_params checks them against the model too).
    top_k: Annotated[StrictInt, Field(ge=-1, le=1_048_576)] | None = None  # -1 / 0: no cut (vLLM's convention)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None  # {"token id": bias}

    def adjustments(self) -> dict[str, Any]:
        """The logit adjustments as `Engine.params` takes them (logit_bias keys as ints; a
        key that is not a token id is a ValueError naming it)."""
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                if not key.isascii() or not key.isdigit() or len(key) > 10:
                    raise ValueError(f"logit_bias: key {printable(key)[:20]!r} is not a token id")
                bias[int(key)] = value
        return {"top_k": None if self.top_k in (None, 0, -1) else self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "logit_bias": bias}

    # Spec fields Bastion does not act on -> the values that mean "off" (shown in the 400):
    # anything else is refused naming the field, since silently different output is worse.
    # Their types repeat the rule, so a parsed request can hold nothing else.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, body: Any) -> Any:
        # The one check of every text in a request (prompt, messages, stop strings, model,
        # names), before any field is read.
        bad = unencodable_text(body)
        if bad is not None:
            field, what = bad
            raise PydanticCustomError("invalid_unicode", "{what} is not valid Unicode (a lone surrogate)",
                                      {"field": field, "what": what})
        return body

    @model_validator(mode="before")
    @classmethod
    def _neutral_only(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            return body
        for name, allowed in cls.NEUTRAL.items():
            if name in body and not any(_same(body[name], a) for a in allowed):
                raise PydanticCustomError("unsupported_value", "not supported by this server: send {allowed} (or "
                                          "leave it out)", {"field": name, "allowed": " or ".join(map(json.dumps, allowed))})
        return body

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")
        return stops


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # always strict here: the output is constrained either way


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class CompletionRequest(_Sampling):
    """`prompt` in any of the spec's four forms: a string, a list of strings, a list of token
    ids, a list of token-id lists; `prompts()` gives them as a list of prompts (each a string
    or a token-id list), in order."""

    prompt: str | list[str] | TokenIds | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {**_Sampling.NEUTRAL, "best_of": (None, 1), "suffix": (None,)}
    echo: StrictBool = False  # the prompt before the completion (with logprobs: the prompt's too)
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # top alternatives per token
    best_of: Literal[1] | None = None
    suffix: None = None
    response_format: ResponseFormat | None = None  # not in OpenAI's completions; vLLM's extension

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        prompts = cls._split(value)
        if not prompts:
            raise ValueError("prompt is an empty list")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts, over the limit of {MAX_PROMPTS}")
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"{where} is over {MAX_PROMPT_CHARS} characters")
            if isinstance(prompt, list) and not prompt:
                raise ValueError(f"{where} is an empty list of token ids")
        return value

    @staticmethod
    def _split(value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(v, int) for v in value):
            return [list(value)]  # one prompt as token ids
        return list(value)  # strings, or token-id lists

    def prompts(self) -> list[str | list[int]]:
        return self._split(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class FunctionCall(_Strict):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS)  # JSON text, as the API sends it


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # null: an assistant message that only calls tools
    name: str | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=256)
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=128)] | None = None
    refusal: None = None

    @field_validator("content")
    @classmethod
    def _bounded(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        size = 0 if value is None else len(value) if isinstance(value, str) else sum(len(p.text) for p in value)
        if size > MAX_PROMPT_CHARS:
            raise ValueError(f"message content is over {MAX_PROMPT_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _content_or_calls(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.content is None and self.tool_calls is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def plain(self) -> dict[str, Any]:
        """{"role", "content"}, with `tool_calls` as the API has them (`tools.flatten` turns
        them into text)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=65_536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str = Field(max_length=64)


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    # Neutral values only (NEUTRAL): the spec's defaults, or "off".
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_Sampling.NEUTRAL, "store": (None, False), "service_tier": (None, "auto", "default"),
        "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "metadata": (None, {}),
        "reasoning_effort": (None,), "web_search_options": (None,), "functions": (None, []),
        "function_call": (None, "none"), "verbosity": (None,)}
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = Field(default=None, max_length=1)
    audio: None = None
    prediction: None = None
    metadata: Annotated[dict[str, Any], Field(max_length=0)] | None = None  # only stored completions have it
    reasoning_effort: None = None
    web_search_options: None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None  # the deprecated form of tools
    function_call: Literal["none"] | None = None
    verbosity: None = None
    # Hints that change no output: accepted, bounded, unused.
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("logprobs_needed", "top_logprobs needs logprobs: true", {"field": "top_logprobs"})
        return self

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def finish_reason(engine_reason: str) -> str:
    """Engine finish reasons -> OpenAI's: end of turn and stop strings are both "stop"."""
    return "length" if engine_reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int, logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(choices)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": lp}
                        for i, ((text, reason), lp) in enumerate(zip(choices, logprobs))],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(rid: str, model: str, choices: list[tuple[str | dict[str, Any], str]], prompt_tokens: int,
                  completion_tokens: int, logprobs: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    logprobs = logprobs or [None] * len(choices)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "refusal": None,
                                                 **({"content": text} if isinstance(text, str) else text)},
                         "finish_reason": reason, "logprobs": lp}
                        for i, ((text, reason), lp) in enumerate(zip(choices, logprobs))],
            "usage": usage(prompt_tokens, completion_tokens)}


def _finite(value: float) -> float:
    """A logprob JSON can carry: -inf (a banned token) as the most negative float."""
    return value if value > -1e308 else -1e308


def completion_logprobs(entries: list[Any], first: str | None, piece: Any, offset: int = 0) -> dict[str, Any]:
    """The completions API's logprobs object over `entries` (generate.TokenLogprob, in text
    order). `first`: the first prompt token's string when the prompt is echoed (it has no
    logprob: null). `piece(id)` -> the token's text. top_logprobs: the alternatives and the
    chosen token, {text: logprob}. `offset`: where the first token's text starts (a stream's
    later chunks)."""
    tokens, values, tops = [], [], []
    if first is not None:
        tokens.append(first)
        values.append(None)
        tops.append(None)
    for entry in entries:
        tokens.append(piece(entry.token_id))
        values.append(_finite(entry.logprob))
        top = {piece(t): _finite(lp) for t, lp in entry.top}
        top.setdefault(tokens[-1], values[-1])
        tops.append(top)
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[Any], piece: Any) -> dict[str, Any]:
    """The chat API's logprobs object: per completion token its text, logprob, UTF-8 bytes
    and top alternatives."""
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(piece(e.token_id), e.logprob), "top_logprobs": [item(piece(t), lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None,
                     logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}]}


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, Any], reason: str | None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}]}


def usage_chunk(rid: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": printable(message), "type": kind, "param": None if param is None else printable(param),
                      "code": code}}
