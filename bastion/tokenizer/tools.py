"""Tool calling as text: how tools, tool calls and tool results enter a conversation, and
how a model's reply is read back as calls.

One format for every model and template, the one Hermes- and Qwen-style models use: the
tools are described in the system message as JSON inside <tools></tools>, and a reply that
calls tools is one or more blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

separated by newlines and nothing else. Tool results are `tool` messages. `flatten` turns
an OpenAI-style conversation (assistant `tool_calls`, `tool` messages, a `tools` list) into
plain role/content messages before any template sees it, so the chat template renders them
like any other text and `ChatFormat`'s forgery protection covers them unchanged: the tags are
plain text (no special ids), and a message can only end with the end-of-turn id. Fine-tuning
data with tool calls goes through the same `flatten`, so a model learns exactly the text it
is later asked to produce and that `parse_calls` reads.

`call_grammar` is the Lark grammar (for llguidance) of a reply under `tool_choice`: with
"required" or a named function it is calls only, each call's arguments constrained by that
function's `parameters` schema; with "auto" it is either calls or text that does not start
with <tool_call>.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from bastion.errors import DataError
from bastion.safeio import parse_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # hard cap; ServeConfig.max_tools is the configured one

_PREAMBLE = (
    "# Tools\n\n"
    "You can call the functions described below, as JSON, inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "To call one or more of them, reply with only the calls, each on its own like this:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>"
)
# How calls' JSON is laid out: as format_calls (json.dumps) writes it, so a model fine-tuned
# on flattened conversations is held to the text it learned (llguidance's JSON options).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CALL_RE = re.compile(r"\s*<tool_call>\n(?P<body>.*?)\n</tool_call>", re.S)


def check_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """Validated copies of an OpenAI `tools` list: [{"type": "function", "function":
    {"name", "description"?, "parameters"?, "strict"?}}], names unique. DataError otherwise."""
    if not isinstance(tools, list):
        raise DataError(f"{where} must be a list, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise DataError(f"{where}: {len(tools)} tools, over the limit of {MAX_TOOLS}")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"), Mapping):
            raise DataError(f"{where}[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if set(tool) - {"type", "function"}:
            raise DataError(f"{where}[{i}] has unsupported key(s) {sorted(set(tool) - {'type', 'function'})}")
        fn = dict(tool["function"])
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise DataError(f"{where}[{i}].function has unsupported key(s) {sorted(extra)}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise DataError(f"{where}[{i}].function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {str(name)[:80]!r}")
        if name in names:
            raise DataError(f"{where}[{i}]: a second function named {name!r}")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise DataError(f"{where}[{i}].function.description must be a string")
        if "parameters" in fn and not isinstance(fn["parameters"], Mapping):
            raise DataError(f"{where}[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def format_calls(calls: Sequence[tuple[str, Any]]) -> str:
    """(name, arguments object) pairs -> the reply text that makes them."""
    return "\n".join(f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"
                     for name, args in calls)


def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """A reply -> its calls as (name, arguments as JSON text), or None when it is not a
    tool-call reply (it must be calls only, each parsing as {"name", "arguments": {...}})."""
    if not text.lstrip().startswith(OPEN):
        return None
    calls, end = [], 0
    for match in _CALL_RE.finditer(text):
        if match.start() != end:
            return None
        try:
            call = json.loads(match["body"])
        except ValueError:
            return None
        if not isinstance(call, dict) or set(call) != {"name", "arguments"} or not isinstance(call["name"], str) \
                or not isinstance(call["arguments"], dict):
            return None
        calls.append((call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
        end = match.end()
    return calls if calls and not text[end:].strip() else None


def _call_arguments(call: Any, where: str) -> tuple[str, Any]:
    """One OpenAI `tool_calls` entry -> (name, arguments object)."""
    if not isinstance(call, Mapping) or call.get("type", "function") != "function" \
            or not isinstance(call.get("function"), Mapping):
        raise DataError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    fn = call["function"]
    name, arguments = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DataError(f"{where}.function.name must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
    if isinstance(arguments, str):  # the API's form: JSON text, its nesting bounded before parsing
        arguments = parse_json(arguments, DataError, f"{where}.function.arguments")
    if not isinstance(arguments, dict):
        raise DataError(f"{where}.function.arguments must be a JSON object")
    return name, arguments


def flatten(messages: Any, tools: Any = None) -> list[dict[str, Any]]:
    """An OpenAI-style conversation -> plain {"role", "content"} messages (ordering and
    content rules stay `check_conversation`'s): assistant `tool_calls` become call text after
    the message's content, a `tool` message keeps its content (its `tool_call_id` and `name`
    only tie it to the call), and `tools` are described at the end of the system message (a
    system message is added when there is none). Messages without those keys pass through."""
    if not isinstance(messages, list):
        return messages  # check_conversation says what is wrong
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            out.append(m)
            continue
        m = dict(m)
        if m.get("role") == "assistant" and "tool_calls" in m:
            calls = m.pop("tool_calls")
            if calls is not None:
                if not isinstance(calls, list) or not calls:
                    raise DataError(f"message {i}: tool_calls must be a non-empty list")
                text = format_calls([_call_arguments(c, f"message {i}: tool_calls[{j}]") for j, c in enumerate(calls)])
                content = m.get("content") or ""
                if not isinstance(content, str):
                    raise DataError(f"message {i} (assistant) content must be a string or null")
                m["content"] = f"{content}\n{text}" if content.strip() else text
        if m.get("role") == "tool":
            for key in ("tool_call_id", "name"):
                if key in m and not isinstance(m.pop(key), (str, type(None))):
                    raise DataError(f"message {i} (tool): {key} must be a string")
        out.append(m)
    if tools:
        tools = check_tools(tools)
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = _PREAMBLE.format(tools=listing)
        if out and isinstance(out[0], Mapping) and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def call_grammar(tools: list[dict[str, Any]], choice: str, *, parallel: bool) -> str:
    """The Lark grammar of a reply under `choice`: "auto" (text or calls), "required" (one
    or more calls of any tool), or a function's name (calls of that one). `parallel`: more
    than one call allowed."""
    functions = [t["function"] for t in tools]
    if choice not in ("auto", "required"):
        functions = [f for f in functions if f["name"] == choice]
    rules = []
    for k, fn in enumerate(functions):
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                    "arguments": fn.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_LAYOUT}
        rules.append(f"call_{k}: \"{OPEN}\\n\" %json {json.dumps(schema, separators=(',', ':'))} \"\\n{CLOSE}\"")
    alternatives = " | ".join(f"call_{k}" for k in range(len(functions)))
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = "start: TEXT | calls\nTEXT: /(.|\\n)+/ & ~/\\s*<tool_call>(.|\\n)*/" if choice == "auto" else "start: calls"
    return "\n".join([start, f"calls: {calls}", f"call: {alternatives}", *rules])
