"""The server over real HTTP on loopback: the official openai client unchanged, and raw
requests for every limit and refusal the server promises."""
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from serving import API_KEY, running

from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.infer import generate
from bastion.serve import protocol as P
from bastion.serve.server import build_state

ENV = {"BASTION_API_KEYS": API_KEY}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    with running(serve_checkpoint, environ=ENV, serve={"rate_limit": {"requests_per_minute": 10_000,
                                                                       "tokens_per_minute": 10_000_000}}) as (url, state):
        yield url, state


def client(url, key=API_KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_openai_client_completions_and_chat(server):
    url, state = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == [state.model_name]
    done = c.completions.create(model=state.model_name, prompt="reverse: a b", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chat = c.chat.completions.create(model=state.model_name, messages=[{"role": "user", "content": "greet kalomi"}],
                                     max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streaming_matches_non_streaming(server, kind):
    url, state = server
    c = client(url)
    if kind == "chat":
        args = dict(model=state.model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=12,
                    temperature=0)
        whole = c.chat.completions.create(**args)
        chunks = list(c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        expected, reason = whole.choices[0].message.content, whole.choices[0].finish_reason
    else:
        args = dict(model=state.model_name, prompt="the quick", max_tokens=12, temperature=0)
        whole = c.completions.create(**args)
        chunks = list(c.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        expected, reason = whole.choices[0].text, whole.choices[0].finish_reason
    assert text == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_every_route_but_health_needs_a_key(server):
    url, _ = server
    routes = [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("GET", "/nope"), ("GET", "/openapi.json"), ("GET", "/docs")]
    with httpx.Client(base_url=url) as h:
        assert h.get("/health").status_code == 200
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}):
                r = h.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["x-content-type-options"] == "nosniff"
        ready = h.get("/ready", headers=AUTH)
        assert ready.status_code == 200 and ready.headers.get_list("x-content-type-options") == ["nosniff"]
        assert h.get("/metrics", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(url, key="bst_wrong").models.list()


def post(url, path, body, headers=AUTH, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json", **headers}, **kw)


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"model": "x", "prompt": "\xff\xfe"}', 400, None),
    ({"model": "M", "prompt": "hi", "logit_bias": {"x": 5}}, 400, "logit_bias: key 'x' is not a token id"),
    ({"model": "M", "prompt": "hi", "logit_bias": {"1": 101}}, 400, "logit_bias"),
    ({"model": "M", "prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias: token ids must be in"),
    ({"model": "M", "prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "over this server's limit of 300"),
    ({"model": "M", "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "M", "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "M", "prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    ({"model": "M", "prompt": "hi", "top_k": -2}, 400, "top_k"),
    ({"model": "M", "prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, 400, "echo: not available with stream"),
    ({"model": "M", "prompt": "hi", "echo": True, "stream": True}, 400, "echo: not available with stream"),
    ({"model": "M", "prompt": "hi", "logprobs": 6}, 400, "logprobs is 6, over this server's limit of 5"),
    ({"model": "M", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": "M", "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"model": "M", "prompt": "hi", "echo": 1}, 400, "echo"),
    ({"model": "M", "prompt": "hi", "best_of": 2}, 400, "best_of"),
    ({"model": "M", "prompt": []}, 400, "prompt is an empty list"),
    ({"model": "M", "prompt": [[]]}, 400, "empty list of token ids"),
    ({"model": "M", "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": "M", "prompt": [1, -2]}, 400, "prompt"),
    ({"model": "M", "prompt": [1.0, 2.0]}, 400, "prompt"),
    ({"model": "M", "prompt": [True, 2]}, 400, "prompt"),
    ({"model": "M", "prompt": [1, 10**9]}, 400, "token id 1000000000 is outside the model's vocabulary"),
    ({"model": "M", "prompt": [[1, 2], [3, 10**9]]}, 400, "prompt 1: token id 1000000000 is outside"),
    ({"model": "M", "prompt": ["a"] * 17}, 400, "17 prompts, over this server's limit of 16"),
    ({"model": "M", "prompt": ["a"] * 129}, 400, "129 prompts, over the limit of 128"),
    ({"model": "M", "prompt": ["a", "hi " * 200]}, 400, "prompt"),
    ({"model": "M", "prompt": "hi", "max_tokens": 65}, 400, "max_new_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "M", "prompt": "hi", "n": 2}, 400, "n is 2"),
    ({"model": "M", "prompt": "hi", "stop": ["a"] * 9}, 400, "stop strings"),
    ({"model": "M", "prompt": "hi", "stop": ["x" * 300]}, 400, "stop"),
    ({"model": "M", "prompt": "hi " * 200}, 400, "prompt"),
    ({"model": "M", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "other", "prompt": "hi"}, 404, "does not exist"),
    ({"prompt": "hi"}, 400, "model"),
    ([1, 2, 3], 400, None),
    ("null", 400, None),
])
def test_bad_requests_are_4xx_with_a_clear_message(server, body, status, match):
    url, state = server
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": state.model_name}
    r = post(url, "/v1/completions", body)
    assert r.status_code == status, r.text
    if match:
        assert match in r.json()["error"]["message"]


def test_prompts_as_strings_token_ids_and_batched_lists(server):
    """The spec's four prompt forms; a list of prompts gives len(prompts) x n choices,
    choice i * n + j for prompt i, each equal to that prompt sent alone."""
    url, state = server
    c = client(url)
    tok = state.loaded.tokenizer
    args = dict(model=state.model_name, max_tokens=6, temperature=0)
    alone = {p: c.completions.create(prompt=p, **args) for p in ("the quick", "reverse: a b", "hello")}
    ids = tok.encode_prompt("the quick")
    as_ids = c.completions.create(prompt=ids, **args)
    assert as_ids.choices[0].text == alone["the quick"].choices[0].text
    assert as_ids.usage.prompt_tokens == alone["the quick"].usage.prompt_tokens == len(ids)
    batch = c.completions.create(prompt=["the quick", "reverse: a b", "hello"], **args)
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert [ch.text for ch in batch.choices] == [alone[p].choices[0].text for p in ("the quick", "reverse: a b", "hello")]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone.values())
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone.values())
    id_batch = c.completions.create(prompt=[tok.encode_prompt(p) for p in ("reverse: a b", "hello")], **args)
    assert [ch.text for ch in id_batch.choices] == [alone[p].choices[0].text for p in ("reverse: a b", "hello")]
    chunks = list(c.completions.create(prompt=["the quick", "hello"], stream=True, **args))
    streamed = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert streamed == {0: alone["the quick"].choices[0].text, 1: alone["hello"].choices[0].text}


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    url, state = server
    completion = {"model": state.model_name, "prompt": "hi", "max_tokens": 2, "echo": False, "logprobs": None,
                  "best_of": 1, "suffix": None, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0}
    assert post(url, "/v1/completions", completion).status_code == 200
    chat = {"model": state.model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "parallel_tool_calls": False, "store": False, "service_tier": "auto",
            "modalities": ["text"], "logit_bias": None, "audio": None, "prediction": None, "metadata": {},
            "reasoning_effort": None, "web_search_options": None, "functions": [], "function_call": "none",
            "verbosity": None, "prompt_cache_key": "k1", "safety_identifier": "u1"}
    r = post(url, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["refusal"] is None
    for field, value in (("store", True), ("modalities", ["text", "audio"]), ("service_tier", "flex"),
                         ("reasoning_effort", "low"), ("functions", [{"name": "f"}]), ("metadata", {"a": "b"}),
                         ("audio", {"voice": "x"}), ("verbosity", "high")):
        r = post(url, "/v1/chat/completions", {**chat, field: value})
        assert r.status_code == 400, (field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and error["message"].startswith(f"{field}: not supported by this server")
    models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]
    manifest = state.loaded.directory / "MANIFEST.json"
    assert models["created"] == int(manifest.stat().st_mtime) > 0


def test_completion_logprobs_are_the_models_own(server):
    url, state = server
    c = client(url)
    tok, model = state.loaded.tokenizer, state.loaded.model
    done = c.completions.create(model=state.model_name, prompt="the quick", max_tokens=8, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    result = generate(model, tok, "the quick", limits=state.limits, max_new_tokens=8, temperature=0, logprobs=2)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(result.token_ids)
    assert lp.tokens == [tok.decode([t]) for t in result.token_ids]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in result.logprobs], abs=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == value and len(top) <= 3 and value == pytest.approx(max(top.values()))  # greedy
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_with_logprobs_scores_a_prompt_as_lm_eval_asks(server):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1; it sums
    token_logprobs[ctxlen:-1] and checks each is the top one (is_greedy)."""
    url, state = server
    tok, model = state.loaded.tokenizer, state.loaded.model
    context, continuation = tok.encode("reverse: a b"), tok.encode(" b a")
    ids = context + continuation
    body = {"model": state.model_name, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(tok.decode(ids)) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][:len(ids)] == [tok.decode([t]) for t in ids]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    want = [reference[i - 1, ids[i]].item() for i in range(len(context), len(ids))]
    assert lp["token_logprobs"][len(context):-1] == pytest.approx(want, abs=1e-4)
    greedy = [reference[i - 1].argmax().item() == ids[i] for i in range(len(context), len(ids))]
    assert [v == pytest.approx(max(top.values())) for v, top in
            zip(lp["token_logprobs"][len(context):-1], lp["top_logprobs"][len(context):-1])] == greedy
    plain = post(url, "/v1/completions", {**body, "logprobs": None}).json()["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None


def test_echo_scores_end_with_the_end_token_when_the_model_ends_there(server):
    """When the one generated token is the end of text (a continuation that ends a document),
    it still closes the logprobs: lm-eval drops the last entry as the generated token, and
    without it would drop the continuation's last token instead (sample off by a token)."""
    url, state = server
    tok, model = state.loaded.tokenizer, state.loaded.model
    ids = tok.encode("reverse: a b b a")
    body = {"model": state.model_name, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0, "logit_bias": {str(tok.eos_id): 100}}  # the model's scores are before the bias
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"] == tok.decode(ids)  # no end-token text
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == tok.decode([tok.eos_id])
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    assert lp["token_logprobs"][1:] == pytest.approx([reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
                                                      + [reference[-1, tok.eos_id].item()], abs=1e-4)
    assert lp["text_offset"][-1] == len(choice["text"])
    # Without echo: the end token is the one entry, though the completion's text is empty.
    plain = post(url, "/v1/completions", {**body, "echo": False}).json()["choices"][0]
    assert plain["text"] == "" and plain["logprobs"]["tokens"] == [tok.decode([tok.eos_id])]


def test_chat_logprobs_and_their_limits(server):
    url, state = server
    c = client(url)
    args = dict(model=state.model_name, messages=[{"role": "user", "content": "greet kalomi"}], max_tokens=6,
                temperature=0)
    chat = c.chat.completions.create(**args, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and chat.choices[0].message.refusal is None
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top one
    assert c.chat.completions.create(**args, logprobs=False).choices[0].logprobs is None
    for extra, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 6}, "top_logprobs")):
        r = post(url, "/v1/chat/completions", {**args, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_streamed_logprobs_concatenate_to_the_whole_responses(server):
    """Each chunk carries the logprobs of the tokens whose text it sends; together they are
    the non-streamed response's, for both routes, with stop strings (held-back text) and n."""
    url, state = server
    c = client(url)
    for stop in (None, ["b"]):
        args = dict(model=state.model_name, prompt="reverse: a b c", max_tokens=12, temperature=0, logprobs=2, n=1,
                    stop=stop)
        whole = c.completions.create(**args).choices[0]
        chunks = [ch.choices[0] for ch in c.completions.create(**args, stream=True) if ch.choices]
        parts = [ch.logprobs for ch in chunks if ch.logprobs is not None]
        assert sum((p.tokens for p in parts), []) == whole.logprobs.tokens
        assert sum((p.token_logprobs for p in parts), []) == whole.logprobs.token_logprobs
        assert sum((p.text_offset for p in parts), []) == whole.logprobs.text_offset
        assert sum((p.top_logprobs for p in parts), []) == whole.logprobs.top_logprobs
        assert "".join(ch.text for ch in chunks) == whole.text
    args = dict(model=state.model_name, messages=[{"role": "user", "content": "greet kalomi"}], max_tokens=8,
                temperature=0, logprobs=True, top_logprobs=2)
    whole = c.chat.completions.create(**args).choices[0].logprobs.content
    streamed = [entry for ch in c.chat.completions.create(**args, stream=True) if ch.choices and ch.choices[0].logprobs
                for entry in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole] and whole


def test_logprobs_are_refused_while_the_output_filter_is_on(serve_checkpoint):
    with running(serve_checkpoint, environ=ENV, serve={"output_filter": True}) as (url, state):
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": "hi", "logprobs": 1})
        assert r.status_code == 400 and "output_filter" in r.json()["error"]["message"]
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": "hi", "echo": True, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("hi")


def test_per_request_sampling_knobs_match_generate(server):
    """top_k, min_p, repetition / frequency / presence penalties and logit_bias reach the
    sampler: the server's tokens equal generate()'s with the same settings."""
    url, state = server
    c = client(url)
    tok, model = state.loaded.tokenizer, state.loaded.model
    knobs = dict(top_k=5, min_p=0.05, repetition_penalty=1.3)
    done = c.completions.create(model=state.model_name, prompt="the quick", max_tokens=10, temperature=0.8, seed=3,
                                frequency_penalty=0.7, presence_penalty=0.3, logit_bias={"7": -100}, extra_body=knobs)
    want = generate(model, tok, "the quick", limits=state.limits, max_new_tokens=10, temperature=0.8, seed=3,
                    frequency_penalty=0.7, presence_penalty=0.3, logit_bias={7: -100}, **knobs)
    assert done.choices[0].text == want.text
    forced = c.chat.completions.create(model=state.model_name, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logit_bias={"42": 100})
    assert forced.choices[0].message.content == tok.decode([42] * 4)


def test_serve_dtype_bfloat16(serve_checkpoint):
    with running(serve_checkpoint, environ=ENV, serve={"dtype": "bfloat16"}) as (url, state):
        assert state.loaded.dtype == "bfloat16" and state.engine.model.tok_embeddings.weight.dtype == torch.bfloat16
        done = client(url).completions.create(model=state.model_name, prompt="the quick", max_tokens=6, temperature=0,
                                              logprobs=1)
        assert done.choices[0].finish_reason in ("stop", "length") and done.choices[0].logprobs.token_logprobs
    config = build_config({"serve": {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError, match="exclusive"):
        build_state(serve_checkpoint, config, environ={}, quantize="int8")


def test_chat_message_problems_are_400(server):
    url, state = server
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"role": "user"}],
                     [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]):
        r = post(url, "/v1/chat/completions", {"model": state.model_name, "messages": messages})
        assert r.status_code == 400, (messages, r.text)


def test_body_size_limit_is_413_declared_or_streamed(server):
    url, state = server
    big = json.dumps({"model": state.model_name, "prompt": "x" * (2 * 2**20)})
    assert post(url, "/v1/completions", big).status_code == 413

    def chunks():
        yield b'{"model": "m", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_metrics_count_requests_tokens_and_rejections(server):
    url, state = server
    post(url, "/v1/completions", {"model": state.model_name, "prompt": "hi", "max_tokens": 2})
    post(url, "/v1/completions", b"{bad")
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'bastion_requests_total{route="/v1/completions",status="200"}' in text
    assert 'bastion_tokens_total{kind="completion"}' in text
    assert "bastion_rejections_total" in text and "bastion_queue_depth" in text
    assert "bastion_request_latency_seconds_bucket" in text


def test_disconnect_mid_stream_frees_the_slot_and_others_are_served(serve_checkpoint, long_prompt):
    with running(serve_checkpoint, serve={"max_concurrency": 1, "max_queue": 0},
                 generate={"max_new_tokens_ceiling": 100}, step_seconds=0.05) as (url, state):
        body = {"model": state.model_name, "prompt": long_prompt, "max_tokens": 100, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then the client goes away
            assert state.engine.stats["running"] == 1
        deadline = time.time() + 10
        while state.engine.stats["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert state.engine.stats["running"] == 0
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": "b", "max_tokens": 4}, headers={})
        assert r.status_code == 200


def test_queue_full_is_503_with_retry_after(serve_checkpoint, long_prompt):
    with running(serve_checkpoint, serve={"max_concurrency": 1, "max_queue": 0},
                 generate={"max_new_tokens_ceiling": 100}, step_seconds=0.05) as (url, state):
        body = {"model": state.model_name, "prompt": long_prompt, "max_tokens": 100, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            assert state.engine.stats["running"] == 1
            busy = post(url, "/v1/completions", {"model": state.model_name, "prompt": "b"}, headers={})
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["code"] == "overloaded"
            assert 'bastion_rejections_total{reason="overloaded"}' in httpx.get(url + "/metrics").text


def test_rate_limits_per_key(serve_checkpoint):
    keys = {"BASTION_API_KEYS": f"{API_KEY},bst_other-key-0123456789abcdefghijklmnopqrstu"}
    with running(serve_checkpoint, environ=keys, serve={"rate_limit": {"requests_per_minute": 3,
                                                                       "tokens_per_minute": 100_000}}) as (url, state):
        body = {"model": state.model_name, "prompt": "hi", "max_tokens": 1}
        codes = [post(url, "/v1/completions", body).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = post(url, "/v1/completions", body)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 21
        other = {"Authorization": "Bearer bst_other-key-0123456789abcdefghijklmnopqrstu"}
        assert post(url, "/v1/completions", body, headers=other).status_code == 200  # its own bucket


def test_token_rate_limit_and_oversized_request(serve_checkpoint):
    with running(serve_checkpoint, environ=ENV, serve={"rate_limit": {"requests_per_minute": 1000,
                                                                      "tokens_per_minute": 60}}) as (url, state):
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": "hi", "max_tokens": 64})
        assert r.status_code == 400  # can never fit in the bucket: not a 429 to retry forever
        body = {"model": state.model_name, "prompt": "hi", "max_tokens": 20}
        codes = [post(url, "/v1/completions", body).status_code for _ in range(4)]
        assert 200 in codes and codes[-1] == 429


def test_refuses_public_bind_without_keys(serve_checkpoint):
    with pytest.raises(ConfigError, match="no API keys"):
        build_state(serve_checkpoint, build_config({"serve": {"host": "0.0.0.0"}}), environ={})
    state = build_state(serve_checkpoint, build_config({"serve": {"host": "0.0.0.0"}}), environ=ENV)
    assert state.require_keys


def test_slow_client_does_not_block_others(server):
    url, state = server
    host, port = url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n{")  # ...and never the rest
    try:
        t0 = time.time()
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and time.time() - t0 < 10
    finally:
        slow.close()


def test_concurrent_clients(server):
    url, state = server
    results = []

    def one(i):
        r = post(url, "/v1/completions", {"model": state.model_name, "prompt": f"n{i}", "max_tokens": 6,
                                          "temperature": 0})
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12


def test_request_timeout_is_504_and_frees_the_slot(serve_checkpoint, long_prompt):
    with running(serve_checkpoint, serve={"request_timeout_s": 0.05, "max_concurrency": 1},
                 generate={"max_new_tokens_ceiling": 100}, step_seconds=0.05) as (url, state):
        body = {"model": state.model_name, "prompt": long_prompt, "max_tokens": 100, "temperature": 0}
        r = post(url, "/v1/completions", body, headers={})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"code":"timeout"' in events[-1]
        deadline = time.time() + 10
        while state.engine.stats["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert state.engine.stats["running"] == 0


def test_metrics_can_have_a_key_of_its_own(serve_checkpoint):
    metrics_key = "bst_metrics-key-0123456789abcdefghijklmnopq"
    env = {**ENV, "BASTION_METRICS_KEY": metrics_key}
    with running(serve_checkpoint, environ=env, serve={"metrics_key_env": "BASTION_METRICS_KEY"}) as (url, _):
        assert httpx.get(url + "/metrics", headers=AUTH).status_code == 401  # an API key is not enough
        assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {metrics_key}"}).status_code == 401


def test_keys_cli_round_trip(serve_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from bastion.cli import app

    runner = CliRunner()
    keys = tmp_path / "keys.json"
    added = runner.invoke(app, ["serve", "keys", "add", "--key-file", str(keys), "--name", "alice"])
    assert added.exit_code == 0, added.output
    key = next(w for w in added.stdout.split() if w.startswith("bst_"))
    assert key not in keys.read_text() and oct(keys.stat().st_mode & 0o777) == "0o600"
    listed = runner.invoke(app, ["serve", "keys", "list", "--key-file", str(keys)])
    assert "alice" in listed.output and key not in listed.output
    with running(serve_checkpoint, serve={"key_file": str(keys)}) as (url, state):
        h = {"Authorization": f"Bearer {key}"}
        assert httpx.get(url + "/v1/models", headers=h).status_code == 200
        assert runner.invoke(app, ["serve", "keys", "revoke", "--key-file", str(keys), "alice"]).exit_code == 0
        deadline = time.time() + 15  # the key file is re-read when it changes
        while httpx.get(url + "/v1/models", headers=h).status_code == 200 and time.time() < deadline:
            time.sleep(0.5)
        assert httpx.get(url + "/v1/models", headers=h).status_code == 401


def test_serve_threads_reach_the_engine_and_are_bounded(serve_checkpoint):
    state = build_state(serve_checkpoint, build_config({"serve": {"threads": 1}}))
    assert state.engine.threads == 1
    assert build_state(serve_checkpoint, build_config({})).engine.threads is None
    with pytest.raises(ConfigError, match="serve.threads"):
        build_config({"serve": {"threads": 0}})


def completions_log(state, count):
    """The access log's lines for /v1/completions once there are `count` of them (each is
    written when its response has been sent, so it may trail the client by a moment)."""
    deadline = time.time() + 15
    while True:
        lines = [json.loads(x) for x in state.log.path.read_text().splitlines()]
        lines = [x for x in lines if x["path"] == "/v1/completions"]
        if len(lines) >= count or time.time() > deadline:
            return lines


def test_an_exception_in_the_app_is_a_500_logged_as_sent_without_the_prompt(serve_checkpoint, long_prompt, caplog):
    with running(serve_checkpoint) as (url, state):
        calls, marker = [], "PROMPT-" + "TEXT"  # (a traceback quotes source lines: not this one's text)

        def fail_on_the_third_step(module, args):
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError(f"step failed for {marker}")  # an exception quoting the request

        hook = state.engine.model.tok_embeddings.register_forward_pre_hook(fail_on_the_third_step)
        body = {"model": state.model_name, "prompt": long_prompt, "max_tokens": 10, "temperature": 0, "user": "PROMPT-TEXT"}
        r = post(url, "/v1/completions", body, headers={})
        assert r.status_code == 500 and r.json()["error"] == P.error_body("internal error", "server_error")["error"]
        calls.clear()
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as s:
            status, events = s.status_code, [x for x in s.iter_lines() if x.startswith("data: ")]
        assert status == 200 and '"type":"server_error"' in events[-1]  # sent: the failure is told in the stream
        hook.remove()
        assert post(url, "/v1/completions", {**body, "max_tokens": 2}, headers={}).status_code == 200
        logged = completions_log(state, 3)
    assert [(x["status"], x["error"]) for x in logged] == [(500, "RuntimeError"), (200, "RuntimeError"), (200, None)]
    assert "PROMPT-TEXT" not in caplog.text and "internal error on /v1/completions: RuntimeError" in caplog.text


def test_a_client_gone_before_its_response_began_is_logged_499(serve_checkpoint, long_prompt):
    with running(serve_checkpoint, generate={"max_new_tokens_ceiling": 100}, step_seconds=0.05) as (url, state):
        body = {"model": state.model_name, "prompt": long_prompt, "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)
        assert [x["status"] for x in completions_log(state, 1)] == [499]  # its 200 was never sent
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            next(r.iter_lines())
        assert [x["status"] for x in completions_log(state, 2)] == [499, 200]  # the 200 was sent, then it left
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        slow.close()  # gone halfway through its body
        assert [x["status"] for x in completions_log(state, 3)] == [499, 200, 499]


@pytest.mark.parametrize("args", [["--host", "::"], ["--host", "0"], ["--set", "serve.host=0"],
                                  ["--set", "serve.host=::"], ["--host", "[::1]"]])
def test_serve_cli_hosts_are_typed_not_yaml(serve_checkpoint, monkeypatch, args):
    from typer.testing import CliRunner

    from bastion.cli import app

    monkeypatch.delenv("BASTION_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(serve_checkpoint), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    expected = "not an IP address or a host name" if "[" in args[-1] else "reachable from other machines"
    assert expected in result.output and "valid string" not in result.output


def prefix_counters(url, headers=AUTH):
    text = httpx.get(url + "/metrics", headers=headers).text
    values = {}
    for line in text.splitlines():
        for name in ("queried_tokens", "hit_tokens"):
            if line.startswith(f"bastion_prefix_cache_{name}_total "):
                values[name] = float(line.split()[1])
    return values


@pytest.mark.parametrize("scope", ["per_key", "shared"])
def test_prefix_cache_hits_show_in_metrics_and_stay_within_a_key(serve_checkpoint, scope):
    """A repeated prompt prefix is served from the prefix cache (counted in /metrics), with
    the same completion; under per_key another key's request does not hit it."""
    other = "bst_other-key-0123456789abcdefghijklmnopqrstuvw"
    with running(serve_checkpoint, environ={"BASTION_API_KEYS": f"{API_KEY},{other}"},
                 serve={"prefill_chunk_tokens": 8, "prefix_cache_scope": scope}) as (url, state):
        body = {"model": state.model_name, "prompt": "reverse: a b c d e f g h i j k l m n o p q r s t u v w",
                "max_tokens": 6, "temperature": 0}
        first = post(url, "/v1/completions", body).json()
        assert prefix_counters(url)["hit_tokens"] == 0
        by_other = post(url, "/v1/completions", body, headers={"Authorization": f"Bearer {other}"}).json()
        counters = prefix_counters(url)
        assert (counters["hit_tokens"] > 0) == (scope == "shared")
        again = post(url, "/v1/completions", body).json()
        hits = prefix_counters(url)["hit_tokens"]
        assert hits >= counters["hit_tokens"] + 8 and prefix_counters(url)["queried_tokens"] > hits
        assert first["choices"][0]["text"] == by_other["choices"][0]["text"] == again["choices"][0]["text"]
        assert "bastion_prefix_cache_blocks " in httpx.get(url + "/metrics", headers=AUTH).text
