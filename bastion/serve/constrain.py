"""Structured output at the API: `response_format` and `tools` / `tool_choice` -> the grammar
a request decodes under (`bastion/infer/structured.py`), and tool-call replies -> the API's
`tool_calls`, whole or streamed.

Every schema is bounded first (`serve.max_schema_bytes` for the request's schemas together,
`serve.max_schema_depth`, `serve.max_tools`), then compiled and checked by llguidance against
the served tokenizer in a worker thread (cached per grammar): a schema it refuses is a 400
naming `response_format` or `tools`, never a failure inside the engine.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any

from bastion.config.schema import ServeConfig
from bastion.errors import DataError
from bastion.infer.structured import GrammarError, check_schema, compile_grammar, json_grammar, lark_grammar
from bastion.serve import protocol as P
from bastion.serve.filters import OutputFilter
from bastion.tokenizer import tools as T


class StructureError(Exception):
    """A request's structured-output fields cannot be served: (message, param) for a 400."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Structure:
    """What a request asks of its output's shape. `grammar`: the compiled grammar, or None
    (free text). `tools`: the validated tools the prompt describes (empty: none).
    `calls`: the reply may be tool calls, to be returned as `tool_calls`."""

    grammar: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    calls: bool = False


def _tool_choice(body: P._Sampling) -> str:
    choice = getattr(body, "tool_choice", None)
    if choice is None:
        return "auto" if getattr(body, "tools", None) else "none"
    return choice if isinstance(choice, str) else choice.function.name


async def request_structure(cfg: ServeConfig, body: P._Sampling, *, tokenizer: Any, vocab_size: int,
                            end_ids: list[int]) -> Structure:
    """The request's Structure, or StructureError. Compiling runs in a thread: the first
    grammar for a tokenizer builds llguidance's view of it (~0.1 s)."""
    tools = [t.model_dump(exclude_none=True) for t in getattr(body, "tools", None) or []]
    choice = _tool_choice(body)
    fmt = getattr(body, "response_format", None)
    if tools and len(tools) > cfg.max_tools:
        raise StructureError(f"{len(tools)} tools, over this server's limit of {cfg.max_tools}", "tools")
    try:
        T.check_tools(tools)  # names unique; the shapes pydantic checked
    except DataError as exc:
        raise StructureError(str(exc), "tools") from None
    if choice not in ("none", "auto", "required") and choice not in {t["function"]["name"] for t in tools}:
        raise StructureError(f"tool_choice names function {choice!r}, which is not in tools", "tool_choice")
    if choice == "required" and not tools:
        raise StructureError("tool_choice is required but no tools are given", "tool_choice")
    calls = bool(tools) and choice != "none"
    if calls and fmt is not None and fmt.type != "text":
        raise StructureError("response_format json_object / json_schema cannot be combined with tools on this "
                             "server (send tool_choice: none to ignore the tools)", "response_format")
    budget = cfg.max_schema_bytes
    try:
        if calls:
            for i, tool in enumerate(tools):
                params = tool["function"].get("parameters")
                if params is not None:
                    budget -= len(check_schema(params, max_bytes=budget, max_depth=cfg.max_schema_depth,
                                               where=f"tools[{i}].function.parameters").encode())
            grammar = lark_grammar(T.call_grammar(tools, choice, parallel=getattr(body, "parallel_tool_calls", None)
                                                  is not False))
        elif fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
            text = None if schema is None else check_schema(schema, max_bytes=budget, max_depth=cfg.max_schema_depth,
                                                            where="response_format.json_schema.schema")
            grammar = json_grammar(text)
        else:
            return Structure(tools=tuple(tools) if choice != "none" else ())
        compiled = await asyncio.to_thread(compile_grammar, grammar, tokenizer, vocab_size, end_ids)
    except GrammarError as exc:
        raise StructureError(str(exc), "tools" if calls else "response_format") from None
    return Structure(grammar=compiled, tools=tuple(tools), calls=calls)


def prompt_messages(messages: list[dict[str, Any]], structure: Structure) -> list[dict[str, Any]]:
    """The API's messages with tool calls and the tools as text (`tools.flatten`)."""
    return T.flatten(messages, list(structure.tools) or None)


def _redact(value: Any, flt: OutputFilter) -> Any:
    """Every string inside parsed JSON redacted: the arguments stay valid JSON."""
    if isinstance(value, str):
        return flt.apply(value)[0]
    if isinstance(value, dict):
        return {k: _redact(v, flt) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, flt) for v in value]
    return value


def tool_calls(text: str, flt: OutputFilter) -> list[dict[str, Any]] | None:
    """A reply's calls in the API's form (fresh ids, arguments as JSON text), or None when
    the reply is text."""
    calls = T.parse_calls(text)
    if calls is None:
        return None
    out = []
    for name, arguments in calls:
        if flt.enabled:
            arguments = json.dumps(_redact(json.loads(arguments), flt), ensure_ascii=False)
        out.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                    "function": {"name": name, "arguments": arguments}})
    return out


class CallStream:
    """One streamed choice of a request that may call tools: text deltas pass through as
    content until the reply could still be (or is) a tool call, which is held back and
    sent whole, as `tool_calls` deltas, when the choice ends."""

    def __init__(self) -> None:
        self.held = ""
        self.is_text: bool | None = None  # None: not decided yet

    def feed(self, delta: str) -> str:
        """Text that can go out as content now."""
        if self.is_text:
            return delta
        self.held += delta
        head = self.held.lstrip()
        if head.startswith(T.OPEN) or (T.OPEN.startswith(head)):
            return ""  # a call, or still could be one
        self.is_text, out, self.held = True, self.held, ""
        return out

    def finish(self, flt: OutputFilter, *, cut: bool) -> tuple[str, list[dict[str, Any]] | None]:
        """At the end: (content still held, calls or None). A reply `cut` short (out of
        tokens) is never calls: what was held goes out as content."""
        if self.is_text:
            return "", None
        calls = None if cut else tool_calls(self.held, flt)
        return ("", calls) if calls is not None else (self.held, None)
