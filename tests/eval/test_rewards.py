import pytest

from bastion.errors import ConfigError, DataError
from bastion.eval.rewards import parse_reward


def test_exact_and_contains():
    exact, contains = parse_reward("exact"), parse_reward("contains")
    assert exact("  <r>c b a</r>\n", {"answer": "<r>c b a</r>"}) == 1.0
    assert exact("<r>c b</r>", {"answer": "<r>c b a</r>"}) == 0.0
    assert contains("well: 42.", {"answer": "42"}) == 1.0 and contains("41", {"answer": "42"}) == 0.0
    with pytest.raises(DataError, match='"answer"'):
        exact("x", {})


def test_regex_is_a_full_match():
    r = parse_reward(r"regex:<r>[a-j]( [a-j])*</r>")
    assert r("<r>a b</r>", {}) == 1.0
    assert r("<r>a b</r> and more", {}) == 0.0
    assert r.name == r"regex:<r>[a-j]( [a-j])*</r>"


def test_length_bounds():
    assert parse_reward("length:2-4")("abc", {}) == 1.0
    assert parse_reward("length:2-4")("abcde", {}) == 0.0
    assert parse_reward("length:-3")("", {}) == 1.0
    assert parse_reward("length:3-")("ab", {}) == 0.0


@pytest.mark.parametrize("spec,match", [
    ("regex:(", "invalid"), ("regex:" + "a" * 2000, "over the limit"), ("length:5-2", "MIN is larger"),
    ("length:-", "unknown reward"), ("bleu", "unknown reward"), ("exact:x", "unknown reward"), ("regex:", "unknown"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_reward(spec)
