"""The server as users run it: TLS, graceful shutdown of a `bastion serve` process on SIGTERM,
access logs without prompt text, and a property-based fuzz run that never sees a 5xx."""
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serving import API_KEY, free_port, running

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls(serve_checkpoint, tls_pair):
    with running(serve_checkpoint, ssl=tls_pair, environ={"BASTION_API_KEYS": API_KEY}) as (url, state):
        assert url.startswith("https://")
        r = httpx.get(url + "/v1/models", headers=AUTH, verify=ssl.create_default_context(cafile=str(tls_pair[0])))
        assert r.status_code == 200 and r.json()["data"][0]["id"] == state.model_name
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http") + "/health", timeout=5)


def test_access_log_has_no_prompt_text_unless_asked(serve_checkpoint, tmp_path):
    for log_prompts in (False, True):
        log = tmp_path / f"access-{log_prompts}.jsonl"
        with running(serve_checkpoint, environ={"BASTION_API_KEYS": API_KEY},
                     serve={"access_log": str(log), "log_prompts": log_prompts}) as (url, state):
            httpx.post(url + "/v1/completions", headers=AUTH, json={"model": state.model_name,
                                                                    "prompt": "SECRET-PROMPT-TEXT", "max_tokens": 3})
            httpx.get(url + "/v1/models")  # 401
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        done = [x for x in lines if x["path"] == "/v1/completions"][0]
        assert done["status"] == 200 and done["prompt_tokens"] > 0 and done["key_id"].startswith("key_")
        assert API_KEY not in log.read_text()
        assert ("SECRET-PROMPT-TEXT" in log.read_text()) == log_prompts
        assert [x["status"] for x in lines if x["path"] == "/v1/models"] == [401]
        assert oct(log.stat().st_mode & 0o777) == "0o600"


@contextlib.contextmanager
def serve_process(checkpoint, *args, env=None, host="127.0.0.1"):
    """`bastion serve` as a process on a free port, API keys only as `env` gives them;
    yields (url, process) once /health answers on `host`."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "BASTION_API_KEYS"} | (env or {})
    proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *args], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        deadline = time.time() + 120  # starting Python, torch and the app on a loaded 2-core machine
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                # Stop it before reading its stderr: a read from a live server waits for ever.
                if proc.poll() is None:
                    proc.kill()
                pytest.fail(f"bastion serve (exit {proc.wait(30)}) never answered /health:\n"
                            + proc.stderr.read().decode()[-2000:])
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_sigterm_finishes_in_flight_requests_then_exits(serve_checkpoint, tmp_path):
    args = ["--set", "generate.max_new_tokens_ceiling=120", "--set", "serve.shutdown_grace_s=20"]
    with serve_process(serve_checkpoint, *args, env={"BASTION_API_KEYS": API_KEY}) as (url, proc):
        result = {}

        def long_request():
            r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": "tiny", "prompt": "a", "max_tokens": 120, "temperature": 0})
            result["status"], result["body"] = r.status_code, r.json()

        model = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        assert model == "tiny"
        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["status"] == 200, result
        assert proc.wait(60) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)


def test_serve_on_every_ipv6_interface_needs_keys_and_loopback_does_not(serve_checkpoint):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with serve_process(serve_checkpoint, "--host", "::", env={"BASTION_API_KEYS": API_KEY}, host="::1") as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401  # `::` is every interface: keys required
        assert httpx.get(url + "/v1/models", headers=AUTH).status_code == 200
    with serve_process(serve_checkpoint, "--host", "::1", host="::1") as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 200  # loopback only: no key needed


# Text with lone surrogates (which st.text() leaves out) and every other code point.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
NUMBER = st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1e308, 5e-324])
JSON = st.recursive(st.none() | st.booleans() | NUMBER | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
          "stream_options", "max_completion_tokens", "echo", "logprobs", "user", "presence_penalty",
          "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty", "top_logprobs", "best_of",
          "suffix", "response_format", "tools", "tool_choice"]
SOME_TEXT = st.text(min_size=1, max_size=40) | TEXT  # mostly valid, so that generation is reached
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user"] * 6 + ["system", "assistant", "tool", "x"]),
                                 "content": SOME_TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                        "text": SOME_TEXT}), max_size=2)})
# Structured output: JSON schemas built from real keywords with arbitrary values, tool lists.
SCHEMA = st.recursive(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["object", "string", "integer",
                                                                                   "array", "null", "bogus"]),
                                                           "maxLength": st.integers(-1, 5), "pattern": TEXT,
                                                           "enum": st.lists(JSON, max_size=3), "minimum": NUMBER,
                                                           "$ref": st.sampled_from(["#", "#/$defs/a", "http://x/y"]),
                                                           "format": st.sampled_from(["date", "email", "bogus"])}),
                      lambda inner: st.fixed_dictionaries({}, optional={
                          "properties": st.dictionaries(TEXT, inner, max_size=3), "items": inner,
                          "anyOf": st.lists(inner, max_size=3), "$defs": st.dictionaries(TEXT, inner, max_size=2),
                          "required": st.lists(TEXT, max_size=2), "additionalProperties": st.booleans() | inner}),
                      max_leaves=8)
NAME = st.sampled_from(["f", "get_x", "bad name", ""]) | TEXT
RESPONSE_FORMAT = st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "yaml"}]) | st.builds(
    lambda schema, name: {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, SCHEMA, NAME)
TOOL = st.builds(lambda name, schema: {"type": "function", "function": {"name": name, "parameters": schema}},
                 NAME, SCHEMA)
# Bodies close to valid ones, so that the fuzzing reaches generation (the test keeps the
# route's own text field), and everything else.
TOKEN_IDS = st.lists(st.integers(0, 400), min_size=1, max_size=8)  # some past the vocabulary: 400
PLAUSIBLE = st.fixed_dictionaries({"model": st.just("MODEL"),
                                   "prompt": SOME_TEXT | TOKEN_IDS | st.lists(SOME_TEXT | TOKEN_IDS, max_size=3),
                                   "messages": st.lists(MESSAGE, min_size=1, max_size=2)},
                                  optional={"stream": st.booleans(), "max_tokens": st.integers(1, 3),
                                            "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
                                            "stop": st.lists(SOME_TEXT, max_size=3), "seed": st.integers(0, 2**63),
                                            "n": st.sampled_from([1, 1, 1, 2]), "user": st.none() | TEXT,
                                            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
                                            "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
                                            "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
                                            "logit_bias": st.dictionaries(st.integers(0, 400).map(str),
                                                                          st.floats(-100, 100), max_size=3),
                                            "logprobs": st.none() | st.integers(0, 6) | st.booleans(),
                                            "echo": st.booleans(), "top_logprobs": st.integers(0, 3),
                                            "response_format": RESPONSE_FORMAT, "tools": st.lists(TOOL, max_size=3),
                                            "tool_choice": st.sampled_from(["none", "auto", "required"])
                                            | st.fixed_dictionaries({"type": st.just("function"), "function":
                                                                     st.fixed_dictionaries({"name": NAME})}),
                                            "parallel_tool_calls": st.booleans()})


def deep(depth: int) -> bytes:
    return b'{"model": "m", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture(scope="module")
def fuzz_server(serve_checkpoint):
    with running(serve_checkpoint, environ={"BASTION_API_KEYS": API_KEY},
                 serve={"rate_limit": {"requests_per_minute": None, "tokens_per_minute": None}},
                 generate={"max_new_tokens": 2, "max_new_tokens_ceiling": 3}) as (url, state):
        yield url, state


def logged_status(state, lines_before: int) -> int:
    """The status of the access log's line for the request just answered (the line is
    written once the response has been sent, so it may trail the client by a moment)."""
    deadline = time.time() + 10
    while True:
        lines = state.log.path.read_text().splitlines()
        if len(lines) > lines_before or time.time() > deadline:
            return json.loads(lines[-1])["status"]
        time.sleep(0.01)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.one_of(PLAUSIBLE, JSON, st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)),
       raw=st.one_of(st.none(), st.none(), st.binary(max_size=64), st.integers(1, 5000).map(deep)))
@example(path="/v1/completions", body={"model": "MODEL", "prompt": "\ud800"}, raw=None)
@example(path="/v1/chat/completions", body={"model": "MODEL", "messages": [{"role": "user", "content": "a\udfff"}],
                                            "stream": True}, raw=None)
@example(path="/v1/completions", body=None, raw=b'{"model": "MODEL", "prompt": "\xed\xa0\x80"}')
@example(path="/v1/completions", body={"model": "MODEL", "prompt": "hi", "stop": ["\ud800"]}, raw=None)
@example(path="/v1/chat/completions", body={"model": "MODEL", "messages": [{"role": "user", "content": "0"}],  # was a 500
                                            "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                                                "type": "object", "minimum": float("inf")}}}]}, raw=None)
def test_fuzz_never_5xx_and_the_log_says_what_was_sent(fuzz_server, path, body, raw):
    url, state = fuzz_server
    if isinstance(body, dict) and body.get("model") == "MODEL" and "prompt" in body and "messages" in body:
        body.pop("messages" if path == "/v1/completions" else "prompt")
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    content = content.replace(b"MODEL", state.model_name.encode())
    before = len(state.log.path.read_text().splitlines())
    r = httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code < 500, (content[:300], r.text)
    if r.status_code >= 400:
        assert "error" in r.json()
    assert logged_status(state, before) == r.status_code


def test_output_filter_redacts_what_the_model_says(tmp_path):
    """A tiny model fine-tuned to always answer with an email address: served plainly the
    address leaves the server; with serve.output_filter it becomes <EMAIL>, streamed too."""
    from helpers import finetune_config, make_base_checkpoint

    from synthetic.chat import write_jsonl
    from bastion.train.loop import train

    base = make_base_checkpoint(tmp_path / "base", texts=["mail me at bob.smith@example.com today please"] * 50)
    reply = "Mail me at bob.smith@example.com today."
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"question {i}"},
                                                        {"role": "assistant", "content": reply}]} for i in range(64)])
    run = train(finetune_config(base, tmp_path / "chat.jsonl", tmp_path / "run", max_steps=150), quiet=True)
    ask = {"model": "run", "messages": [{"role": "user", "content": "question 7"}], "max_tokens": 40, "temperature": 0}
    with running(run.checkpoint, environ={}) as (url, state):
        plain = httpx.post(url + "/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
    assert plain == reply
    with running(run.checkpoint, environ={}, serve={"output_filter": True}) as (url, state):
        filtered = httpx.post(url + "/v1/chat/completions", json=ask).json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert filtered == streamed == "Mail me at <EMAIL> today."
