"""Structured output over real HTTP: response_format json_object / json_schema and tools with
tool_choice, from an untrained model sampled at temperature 1 (the hardest case for a
constraint: the model itself has no idea what JSON is). Every reply that ends by itself must
parse and validate; bounded schemas make every reply end by itself."""
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from helpers import make_base_checkpoint
from serving import running

from bastion.tokenizer.tools import flatten, parse_calls

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                              "member": {"type": "boolean"}},
             "required": ["name", "age", "member"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 99},
                                             "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                      "maxItems": 2}},
            "required": ["id", "tags"], "additionalProperties": False}},
        "kind": {"enum": ["x", "y", None]}}, "required": ["items", "kind"], "additionalProperties": False},
    "refs_and_unions": {"type": "object", "$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "y": {"type": "boolean"}},
        "required": ["x", "y"], "additionalProperties": False}},
        "properties": {"where": {"$ref": "#/$defs/point"},
                       "label": {"anyOf": [{"type": "string", "pattern": "^[a-z]{1,4}$"}, {"type": "null"}]},
                       "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["where", "label", "code"], "additionalProperties": False},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.manual_seed(0)
    checkpoint = make_base_checkpoint(tmp_path_factory.mktemp("structured") / "tiny", seed=1, max_seq_len=2048)
    with running(checkpoint, generate={"max_new_tokens": 256, "max_new_tokens_ceiling": 256}) as (url, state):
        yield url, state


def post(url, path, body):
    return httpx.post(url + path, json=body, timeout=120)


def chat(state, content="hi", **fields):
    return {"model": state.model_name, "messages": [{"role": "user", "content": content}], "temperature": 1.0,
            "max_tokens": 256, **fields}


def json_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_always_parse_and_validate(server, name):
    url, state = server
    schema = SCHEMAS[name]
    for seed in range(3):
        r = post(url, "/v1/chat/completions", chat(state, f"give {name}", seed=seed, n=1,
                                                   response_format=json_format(schema)))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice  # bounded schema: the grammar ends it
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_and_completions_route(server):
    url, state = server
    for seed in range(3):
        r = post(url, "/v1/chat/completions", chat(state, seed=seed, max_tokens=256,
                                                   response_format={"type": "json_object"}))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # an unbounded object may run out of tokens
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")
    body = {"model": state.model_name, "prompt": ["reverse: a", "greet"], "temperature": 1.0, "max_tokens": 200,
            "seed": 5, "response_format": json_format(SCHEMAS["flat"])}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["text"]), SCHEMAS["flat"])


def test_streamed_json_is_the_same_reply(server):
    url, state = server
    body = chat(state, seed=11, response_format=json_format(SCHEMAS["nested"]))
    whole = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    parts = [chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(**body, stream=True)
             if chunk.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), SCHEMAS["nested"])


def test_tool_calls_with_the_openai_client_round_trip(server):
    url, state = server
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "weather in Paris?"}]
    done = c.chat.completions.create(model=state.model_name, messages=messages, tools=TOOLS, tool_choice="required",
                                     temperature=1.0, seed=3, max_tokens=256, parallel_tool_calls=False)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])
    # The round trip: the assistant's call and the tool's result go back in, the model answers.
    follow = messages + [choice.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    again = c.chat.completions.create(model=state.model_name, messages=follow, tools=TOOLS, tool_choice="none",
                                      temperature=0, max_tokens=8)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")
    # What the model saw: the call as text in the assistant turn, the result in a tool turn.
    flat = flatten([{"role": m["role"], "content": m.get("content"), **({"tool_calls": m["tool_calls"]}
                                                                         if m.get("tool_calls") else {})}
                    for m in follow])
    assert parse_calls(flat[1]["content"]) == [(call.function.name, json.dumps(json.loads(call.function.arguments)))]
    assert flat[2] == {"role": "tool", "content": "18 degrees, sunny"}


def test_named_function_parallel_calls_and_auto(server):
    url, state = server
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = post(url, "/v1/chat/completions", chat(state, seed=seed, tools=TOOLS, tool_choice=named))
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "length":  # parallel calls allowed: an untrained model may go on
            continue
        assert choice["finish_reason"] == "tool_calls", choice
        for call in choice["message"]["tool_calls"]:
            assert call["function"]["name"] == "get_time"
            jsonschema.validate(json.loads(call["function"]["arguments"]), CLOCK["function"]["parameters"])
    kinds = set()
    # Under auto the untrained model answers in text (tests/infer/test_structured.py shows
    # the auto grammar taking calls too); a reply of either kind must be well formed.
    for seed in range(4):
        r = post(url, "/v1/chat/completions", chat(state, seed=seed, tools=TOOLS, tool_choice="auto",
                                                   parallel_tool_calls=False))
        choice = r.json()["choices"][0]
        message = choice["message"]
        if message.get("tool_calls"):
            kinds.add("calls")
            assert choice["finish_reason"] == "tool_calls" and len(message["tool_calls"]) == 1
        else:
            kinds.add("text")
            assert not message["content"].lstrip().startswith("<tool_call>")
    assert "text" in kinds


def test_streamed_tool_calls_arrive_whole(server):
    url, state = server
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    body = dict(model=state.model_name, messages=[{"role": "user", "content": "time?"}], tools=TOOLS,
                tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=256)
    whole = c.chat.completions.create(**body).choices[0].message.tool_calls[0]
    chunks = [ch for ch in c.chat.completions.create(**body, stream=True) if ch.choices]
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert content == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in calls] == \
        [(0, whole.function.name, whole.function.arguments)]


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": json_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})},
     "response_format", "refused"),
    ({"response_format": json_format({"x-guidance": {"whitespace_pattern": "[a-z]*"}})}, "response_format",
     "x-guidance"),
    # Keywords llguidance cannot enforce are refused, never silently ignored; nothing is fetched.
    ({"response_format": json_format({"type": "array", "uniqueItems": True})}, "response_format",
     "Unimplemented keys"),
    ({"response_format": json_format({"$ref": "http://127.0.0.1:9/schema.json"})}, "response_format", "refused"),
    ({"response_format": json_format({"type": "string", "pattern": "(unclosed"})}, "response_format",
     "regex parse error: (unclosed ^ error: unclosed group"),
    ({"response_format": json_format({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                                      "$ref": "#/$defs/a"})}, "response_format", "matches no JSON value"),
    ({"response_format": json_format(json.loads("{\"items\":" * 40 + "{}" + "}" * 40))}, "response_format",
     "nested more than 32"),
    ({"response_format": json_format({"enum": ["x" * 1000] * 40})}, "response_format", "over this server's limit"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "Field required"),
    ({"response_format": {"type": "yaml"}}, "response_format", "does not match"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "second function named"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(65)]}, "tools",
     "over this server's limit of 64"),
])
def test_bad_structured_requests_get_a_400_naming_the_field(server, fields, param, message):
    url, state = server
    r = post(url, "/v1/chat/completions", chat(state, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param or error["param"].startswith(param), error
    assert message in error["message"], error


def test_bad_tool_messages_get_a_400(server):
    url, state = server
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{not json"}}
    messages = [{"role": "user", "content": "t?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]
    r = post(url, "/v1/chat/completions", {**chat(state), "messages": messages, "tools": TOOLS})
    assert r.status_code == 400 and "arguments: not valid JSON" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", {**chat(state), "messages": [{"role": "user", "content": None}]})
    assert r.status_code == 400 and "needs content" in r.json()["error"]["message"]
    r = post(url, "/v1/chat/completions", {**chat(state), "messages": [
        {"role": "user", "content": "x", "tool_calls": [call]}]})
    assert r.status_code == 400 and "only assistant messages have tool_calls" in r.json()["error"]["message"]


def test_a_grammar_failing_mid_reply_is_the_requests_fault_not_a_500(server, monkeypatch):
    """llguidance can stop a reply mid-way (a per-token limit of a pathological schema): that
    is a 400 (an error event once a stream has started), never an internal error."""
    from bastion.infer import structured

    url, state = server

    def fail(self, token):
        raise structured.GrammarError("grammar: the lexer ran out of fuel")

    monkeypatch.setattr(structured.Constraint, "consume", fail)
    body = chat(state, response_format={"type": "json_object"}, max_tokens=8)
    r = post(url, "/v1/chat/completions", body)
    assert r.status_code == 400 and "ran out of fuel" in r.json()["error"]["message"], r.text
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        lines = list(s.iter_lines())
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events and events[-1]["error"]["type"] == "invalid_request_error", (s.status_code, lines)
    assert "ran out of fuel" in events[-1]["error"]["message"]
    monkeypatch.undo()
    assert post(url, "/v1/chat/completions", body).status_code == 200  # the engine went on
