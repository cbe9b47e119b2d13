"""The hostile-input suite over HTTP (issue 13, class 6): every route of a real server on
loopback gets malformed, oversized, deeply nested and oddly encoded requests. Every answer
is a 2xx or a 4xx with one JSON error object (never a 5xx, never a traceback), and the
access log records exactly the status that was sent."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serving import API_KEY, running  # noqa: E402

from helpers import make_base_checkpoint  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
ROUTES = ["/v1/completions", "/v1/chat/completions"]


def _bodies(route: str) -> dict[str, bytes]:
    """Hostile request bodies for one generation route, by name."""
    base = {"model": "tiny", "max_tokens": 2}
    text_field = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    ok = {**base, **text_field}

    def with_(**fields) -> bytes:
        return json.dumps({**ok, **fields}).encode()

    surrogate = '"\\ud800"'
    bodies = {
        "lone-surrogate-text": (with_(prompt="X") if route == "/v1/completions"
                                else with_(messages=[{"role": "user", "content": "X"}])).replace(b'"X"', surrogate.encode()),
        "lone-surrogate-stop": with_(stop=["X"]).replace(b'"X"', surrogate.encode()),
        "lone-surrogate-model": with_(model="X").replace(b'"X"', surrogate.encode()),
        "lone-surrogate-key": with_().replace(b'"max_tokens"', b'"\\udfff"'),
        "invalid-utf8": with_().replace(b'"hi"', b'"h\xff\xfei"'),
        "deep-nesting": b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep-nesting-unclosed": b"[" * 1_000_000,
        "not-an-object": b"[1, 2, 3]",
        "empty": b"",
        "null": b"null",
        "huge-number": with_(max_tokens=10**400),
        "float-max-tokens": with_(max_tokens=1e308),
        "nan-temperature": with_().replace(b'"max_tokens": 2', b'"max_tokens": 2, "temperature": NaN'),
        "infinite-top-p": with_().replace(b'"max_tokens": 2', b'"max_tokens": 2, "top_p": Infinity'),
        "negative-max-tokens": with_(max_tokens=-1),
        "bool-as-int": with_(max_tokens=True),
        "wrong-types": with_(stream="yes", n="2", seed=[1]),
        "duplicate-keys": b'{"model": "tiny", "model": "tiny", ' + json.dumps(text_field)[1:].encode(),
        "nul-bytes": with_(prompt="a\u0000b") if route == "/v1/completions" else with_(
            messages=[{"role": "user", "content": "a\u0000b"}]),
        "many-stops": with_(stop=["s"] * 10_000),
        "long-stop": with_(stop=["s" * 100_000]),
        "huge-string": with_(user="u" * 900_000),
        "over-the-body-limit": with_(user="u" * 2_000_000),
        "unknown-field": with_(totally_unknown=1),
        # Structured output: schemas built to be expensive or to escape the bounds.
        "schema-deep": with_(response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": "X"}})
        .replace(b'"X"', b'{"items":' * 3000 + b"{}" + b"}" * 3000),
        "schema-wide-enum": with_(response_format={"type": "json_schema", "json_schema": {
            "name": "w", "schema": {"enum": [str(i) for i in range(50_000)]}}}),
        "schema-regex-blowup": with_(response_format={"type": "json_schema", "json_schema": {
            "name": "r", "schema": {"type": "string", "pattern": "^(a|aa)*(b{1,1000}){1,1000}$"}}}),
        "schema-remote-ref": with_(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "http://169.254.169.254/latest/meta-data"}}}),
        "schema-self-ref-loop": with_(response_format={"type": "json_schema", "json_schema": {
            "name": "l", "schema": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                                    "$ref": "#/$defs/a"}}}),
        "schema-not-an-object": with_(response_format={"type": "json_schema", "json_schema": {
            "name": "n", "schema": [1, 2]}}),
    }
    if route == "/v1/chat/completions":
        bodies |= {
            "bad-role": with_(messages=[{"role": "root", "content": "hi"}]),
            "content-as-object": with_(messages=[{"role": "user", "content": {"a": 1}}]),
            "many-messages": with_(messages=[{"role": "user", "content": "x"}] * 100_000),
            "no-messages": with_(messages=[]),
            "tools-many": with_(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(5000)]),
            "tools-duplicate-names": with_(tools=[{"type": "function", "function": {"name": "f"}}] * 2),
            "tool-call-bad-arguments": with_(messages=[
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                      "function": {"name": "f", "arguments": "[" * 100_000}}]},
                {"role": "tool", "content": "y"}]),
            "tool-choice-unknown": with_(tools=[{"type": "function", "function": {"name": "f"}}],
                                         tool_choice={"type": "function", "function": {"name": "g"}}),
        }
    return bodies


def _cases() -> list[tuple[str, str, bytes, dict]]:
    cases = [(route, name, body, AUTH) for route in ROUTES for name, body in _bodies(route).items()]
    weird_headers = {"Authorization": "Bearer " + "A" * 8000, "Content-Type": "application/json"}
    cases += [(route, "huge-bearer", b"{}", weird_headers) for route in ROUTES]
    cases += [(route, "no-key", b"{}", {"Content-Type": "application/json"}) for route in ROUTES]
    cases += [(route, "wrong-content-type", b"prompt=hi", {**AUTH, "Content-Type": "text/plain"}) for route in ROUTES]
    cases += [(route, "bearer-lone-surrogate", b"{}", {"Authorization": b"Bearer \xed\xa0\x80"}) for route in ROUTES]
    return cases


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_base_checkpoint(tmp_path_factory.mktemp("hostile_http") / "tiny", seed=1)
    log = tmp_path_factory.mktemp("hostile_http_log") / "access.jsonl"
    with running(ckpt, environ={"BASTION_API_KEYS": API_KEY},
                 serve={"model_name": "tiny", "access_log": str(log),
                        "rate_limit": {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000}}
                 ) as (url, state):
        yield url, log


def _logged_statuses(log: Path) -> list[int]:
    return [json.loads(line)["status"] for line in log.read_text().splitlines() if line.strip()]


def test_every_hostile_request_gets_a_4xx_or_2xx_and_is_logged_as_sent(server):
    url, log = server
    problems, sent = [], []
    with httpx.Client(timeout=60) as client:
        for route, name, body, headers in _cases():
            r = client.post(url + route, content=body, headers=headers)
            sent.append(r.status_code)
            where = f"POST {route} [{name}] -> {r.status_code}"
            if r.status_code >= 500:
                problems.append(f"{where}: {r.text[:300]}")
            elif r.status_code >= 400:
                try:
                    error = r.json()["error"]
                    assert isinstance(error["message"], str) and "\n" not in error["message"]
                    assert "Traceback" not in r.text
                except (ValueError, KeyError, TypeError, AssertionError):
                    problems.append(f"{where}: not one JSON error object: {r.text[:300]}")
        for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
                             ("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("GET", "/" + "x" * 10_000),
                             ("GET", "/v1/models?" + "a=1&" * 5000), ("OPTIONS", "/v1/chat/completions")]:
            r = client.request(method, url + path, headers=AUTH)
            sent.append(r.status_code)
            if r.status_code >= 500:
                problems.append(f"{method} {path[:40]} -> {r.status_code}: {r.text[:300]}")
    assert not problems, "\n".join(problems)
    deadline = time.monotonic() + 30  # a line is written once its response has gone out: wait for the last
    while len(logged := _logged_statuses(log)) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.02)
    missing = sorted((Counter(sent) - Counter(logged)).elements())
    extra = sorted((Counter(logged) - Counter(sent)).elements())
    assert not missing and not extra, f"the access log does not record the statuses sent: missing {missing}, extra {extra}"
