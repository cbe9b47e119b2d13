"""The math reward: equivalence as math (look-alikes), where the answer is read from, and
hostile answers that would hang math-verify bounded by the worker's timeout."""
from __future__ import annotations

import threading
import time

import pytest

from bastion.rewards import Sample, build_reward


@pytest.fixture(scope="module")
def math_reward():
    reward = build_reward({"name": "math", "timeout_s": 1.0})[0]
    yield reward
    reward.close()


def score(reward, completion: str, answer) -> float:
    return reward.score_one(Sample(completion, {"answer": answer}))


@pytest.mark.parametrize("completion,answer,expected", [
    ("0.5", r"\frac{1}{2}", 1.0),
    ("1/2", "0.5", 1.0),
    (r"so the answer is $\frac{1}{2}$", "0.5", 1.0),
    (r"We get \boxed{\frac12}.", "0.5", 1.0),
    (r"first \boxed{3}, then \boxed{5}", "5", 1.0),  # the last boxed answer, not the set {3, 5}
    (r"first \boxed{3}, then \boxed{5}", "3", 0.0),
    (r"<think>maybe 5</think><answer>7</answer> \boxed{5}", "7", 1.0),  # <answer> wins
    ("The answer is 1,000", 1000, 1.0),  # a numeric record answer
    ("x = 2", "2", 1.0),
    (r"$\sqrt{4}$", "2", 1.0),
    ("0.3333", r"\frac{1}{3}", 0.0),  # close is not equal
    ("The answer is 6", "5", 0.0),
    ("banana", "0.5", 0.0),  # not numeric
    ("", "0.5", 0.0),
    ("Paris", "Paris", 1.0),  # a gold that is not math: the same text
    ("London", "Paris", 0.0),
])
def test_equivalence(math_reward, completion, answer, expected):
    assert score(math_reward, completion, answer) == expected


def test_hostile_answers_are_bounded(math_reward):
    """Power towers make sympy evaluate astronomically large numbers and hang math-verify;
    deep braces are refused before parsing. Each scores 0 within the timeout (1 s here), and
    the reward keeps working afterwards."""
    hostile = ["9^9^9^9", r"$9^{9^{9^{9}}}$", r"$10^{10^{10}}$", r"\boxed{" + "{" * 500 + "1" + "}" * 500 + "}",
               "(" * 10_000 + ")" * 10_000, "1" * 100_000]
    assert score(math_reward, "1", "1") == 1.0  # the worker is up
    for text in hostile:
        start = time.monotonic()
        assert score(math_reward, text, "1") == 0.0
        assert time.monotonic() - start < 5.0, text[:30]
        assert score(math_reward, r"\frac{2}{4}", "0.5") == 1.0  # a fresh worker took over if one was killed
    assert math_reward.verifier.restarts >= 3


def test_runs_outside_the_main_thread(math_reward):
    """math-verify's own timeouts (signal.alarm) fail off the main thread; ours do not."""
    results = []
    thread = threading.Thread(target=lambda: results.append(score(math_reward, "0.25", r"\frac{1}{4}")))
    thread.start()
    thread.join(60)
    assert results == [1.0]


def test_building_is_cheap():
    """Nothing starts until the first score (config validate builds every reward)."""
    reward = build_reward({"name": "math"})[0]
    assert reward.verifier._proc is None
    reward.close()
