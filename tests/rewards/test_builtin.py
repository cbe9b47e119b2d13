"""Every built-in reward (but math, test_math.py) against hand-written cases, look-alikes
included, and its refusals: a missing record field, bad parameters."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from bastion.errors import ConfigError, DataError
from bastion.rewards import Sample, build_reward


def reward(name: str, **params):
    return build_reward({"name": name, **params})[0]


def score(r, completion: str, record: dict | None = None, **sample) -> float:
    return r.score_one(Sample(completion, record or {}, **sample))


# ---- exact / normalized / contains -----------------------------------------------------------


def test_exact():
    r = reward("exact")
    assert score(r, "  <r>c b a</r>\n", {"answer": "<r>c b a</r>"}) == 1.0
    assert score(r, "<r>c b</r>", {"answer": "<r>c b a</r>"}) == 0.0
    assert score(r, "Paris", {"answer": "paris"}) == 0.0  # case matters
    assert score(reward("exact", field="label"), "yes", {"label": "yes", "answer": "no"}) == 1.0
    with pytest.raises(DataError, match="'answer'.*missing"):
        score(r, "x", {})
    with pytest.raises(DataError, match="'answer'.*list"):
        score(r, "x", {"answer": ["x"]})


def test_normalized_ignores_case_whitespace_punctuation_and_width():
    r = reward("normalized")
    assert score(r, "  The  ANSWER is: Paris!\n", {"answer": "the answer is paris"}) == 1.0
    assert score(r, "ＰＡＲＩＳ", {"answer": "paris"}) == 1.0  # fullwidth letters (NFKC)
    assert score(r, "Paris, France", {"answer": "Paris"}) == 0.0
    assert score(r, "Pariss", {"answer": "Paris"}) == 0.0


def test_contains():
    r = reward("contains")
    assert score(r, "well: 42.", {"answer": "42"}) == 1.0 and score(r, "41", {"answer": "42"}) == 0.0
    assert score(r, "PARIS", {"answer": "paris"}) == 0.0
    assert score(reward("contains", case_sensitive=False), "PARIS", {"answer": "paris"}) == 1.0
    with pytest.raises(DataError, match="empty"):
        score(r, "anything", {"answer": "  "})


# ---- regex / format ----------------------------------------------------------------------------


def test_regex_modes_and_bounds():
    full = reward("regex", pattern=r"<r>[a-j]( [a-j])*</r>")
    assert score(full, "<r>a b</r>") == 1.0 and score(full, "<r>a b</r> and more") == 0.0
    search = reward("regex", pattern=r"\d+", mode="search")
    assert score(search, "it is 42") == 1.0 and score(search, "none") == 0.0
    capped = reward("regex", pattern=r"a*", max_chars=10)
    assert score(capped, "a" * 10) == 1.0 and score(capped, "a" * 11) == 0.0  # over the cap: not matched


@pytest.mark.parametrize("params,loc", [
    ({"pattern": "("}, "rewards[0].pattern"), ({"pattern": "a" * 1001}, "rewards[0].pattern"),
    ({}, "rewards[0].pattern"), ({"pattern": "a", "mode": "match"}, "rewards[0].mode"),
    ({"pattern": "a", "flags": "x"}, "rewards[0].flags"),
])
def test_regex_bad_params_name_the_field(params, loc):
    with pytest.raises(ConfigError) as info:
        build_reward({"name": "regex", **params})
    assert [p[0] for p in info.value.problems] == [loc]


def test_format():
    r = reward("format")
    assert score(r, "<think>2+2 is 4</think>\n<answer>4</answer>") == 1.0
    assert score(r, "  <think>\nx\n</think><answer>4</answer>\n") == 1.0
    assert score(r, "<answer>4</answer>") == 0.0  # no thinking
    assert score(r, "<think>x</think><answer>4</answer> trailing") == 0.0
    assert score(r, "preamble <think>x</think><answer>4</answer>") == 0.0
    assert score(r, "<think>x<think>y</think><answer>4</answer>") == 0.0  # nested tag
    assert score(r, "<think>x</think><answer>4</answer><answer>5</answer>") == 0.0
    assert score(r, "<think>x</think><answer>4") == 0.0
    custom = reward("format", think_tag="reasoning", answer_tag="final")
    assert score(custom, "<reasoning>x</reasoning><final>4</final>") == 1.0
    with pytest.raises(ConfigError, match="think_tag"):
        build_reward({"name": "format", "think_tag": "a>b"})


# ---- JSON ----------------------------------------------------------------------------------------


def test_json_valid_reads_the_answer_block_a_fence_or_everything():
    r = reward("json_valid")
    assert score(r, '{"a": [1, 2]}') == 1.0
    assert score(r, '<think>...</think><answer>{"a": 1}</answer>') == 1.0
    assert score(r, 'Here you go:\n```json\n{"a": 1}\n```\nDone.') == 1.0
    assert score(r, "{'a': 1}") == 0.0  # Python, not JSON
    assert score(r, '{"a": 1') == 0.0
    assert score(r, "[" * 200 + "]" * 200) == 0.0  # deeper than safeio's nesting bound
    assert score(reward("json_valid", max_chars=5), '{"a": 1}') == 0.0


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name"], "additionalProperties": False}


def test_json_schema_from_param_and_from_record():
    r = reward("json_schema", schema=SCHEMA)
    assert score(r, '{"name": "Ada", "age": 36}') == 1.0
    assert score(r, '{"name": "Ada", "age": -1}') == 0.0
    assert score(r, '{"age": 36}') == 0.0
    assert score(r, "not json") == 0.0
    from_record = reward("json_schema")
    assert score(from_record, '{"name": "Ada"}', {"schema": SCHEMA}) == 1.0
    assert score(from_record, '{"name": 1}', {"schema": SCHEMA}) == 0.0
    assert score(from_record, "[1, 2]", {"schema": '{"type": "array", "maxItems": 2}'}) == 1.0  # a JSON string
    with pytest.raises(DataError, match="'schema'.*missing"):
        score(from_record, "{}", {})


def test_json_schema_follows_its_draft_and_refuses_bad_schemas():
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "maximum": 5,
              "exclusiveMaximum": True}
    assert score(reward("json_schema", schema=draft4), "5") == 0.0  # draft-4's boolean exclusiveMaximum
    assert score(reward("json_schema", schema=draft4), "4") == 1.0
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.schema.*not a valid Draft202012 schema"):
        build_reward({"name": "json_schema", "schema": {"type": "strin"}})
    with pytest.raises(ConfigError, match="unknown \\$schema"):
        build_reward({"name": "json_schema", "schema": {"$schema": "https://example.com/mine", "type": "object"}})
    with pytest.raises(DataError, match="not a valid Draft202012 schema"):
        score(reward("json_schema"), "{}", {"schema": {"minimum": "zero"}})


def test_json_schema_never_fetches_a_remote_ref(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    r = reward("json_schema", schema={"$ref": "http://127.0.0.1:9/evil.json"})
    with pytest.raises(DataError, match="cannot be resolved.*nothing is fetched"):
        score(r, "{}")
    local = reward("json_schema", schema={"$defs": {"n": {"type": "integer"}}, "items": {"$ref": "#/$defs/n"}})
    assert score(local, "[1, 2]") == 1.0 and score(local, "[1.5]") == 0.0  # local references still resolve
    assert attempts == []


# ---- length / overlong / keywords --------------------------------------------------------------


def test_length_in_characters_and_tokens():
    r = reward("length", min=2, max=4)
    assert [score(r, "a" * n) for n in (1, 2, 4, 5)] == [0.0, 1.0, 1.0, 0.0]
    assert score(reward("length", max=3), "") == 1.0 and score(reward("length", min=3), "ab") == 0.0
    tokens = reward("length", max=10, unit="tokens")
    assert score(tokens, "x" * 100, completion_tokens=10) == 1.0 and score(tokens, "x", completion_tokens=11) == 0.0
    with pytest.raises(ConfigError, match="min.*larger than max"):
        build_reward({"name": "length", "min": 5, "max": 2})
    with pytest.raises(ConfigError, match="give min, max or both"):
        build_reward({"name": "length"})


def test_overlong_penalty_by_hand():
    """DAPO with M = 100, buffer 20, penalty 0.5: 0 up to 80 tokens, then -0.5 * (L - 80) / 20."""
    r = reward("overlong", buffer=20, penalty=0.5)

    def at(tokens: int, finish: str = "stop") -> float:
        return score(r, "x", completion_tokens=tokens, max_new_tokens=100, finish_reason=finish)

    assert at(10) == 0.0 and at(80) == 0.0
    assert at(81) == pytest.approx(-0.025) and at(90) == pytest.approx(-0.25) and at(95) == pytest.approx(-0.375)
    assert at(100) == pytest.approx(-0.5)
    assert at(100, "length") == -0.5 and at(30, "length") == -0.5  # cut at the limit: the full penalty
    cut_only = reward("overlong")  # buffer 0: only truncation is punished
    assert score(cut_only, "x", completion_tokens=99, max_new_tokens=100) == 0.0
    assert score(cut_only, "x", completion_tokens=100, max_new_tokens=100, finish_reason="length") == -1.0
    with pytest.raises(DataError, match="max_new_tokens"):
        score(r, "x", completion_tokens=5)


def test_keywords():
    both = reward("keywords", words=["alpha", "Beta"])
    assert score(both, "ALPHA and beta") == 1.0 and score(both, "alpha only") == 0.0
    anyone = reward("keywords", words=["alpha", "beta"], mode="any")
    assert score(anyone, "beta") == 1.0 and score(anyone, "gamma") == 0.0
    exact_case = reward("keywords", words=["Beta"], case_sensitive=True)
    assert score(exact_case, "beta") == 0.0 and score(exact_case, "Beta") == 1.0
    from_record = reward("keywords")
    assert score(from_record, "red and blue", {"keywords": ["red", "blue"]}) == 1.0
    with pytest.raises(DataError, match="'keywords'"):
        score(from_record, "red", {"keywords": "red"})
    with pytest.raises(DataError, match="non-empty strings"):
        score(from_record, "red", {"keywords": ["red", ""]})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.words"):
        build_reward({"name": "keywords", "words": []})
