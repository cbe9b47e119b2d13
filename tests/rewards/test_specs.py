"""--reward spec strings map onto registry entries; pass@k matches its definition."""
from __future__ import annotations

import itertools
from math import comb

import pytest

from bastion.errors import ConfigError
from bastion.rewards import Sample, build_rewards, parse_reward_spec
from bastion.rewards.passk import ks_for, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("spec,entry", [
    ("exact", {"name": "exact"}), ("contains", {"name": "contains"}), ("math", {"name": "math"}),
    ("regex:<r>.*</r>", {"name": "regex", "pattern": "<r>.*</r>"}), ("regex:a:b", {"name": "regex", "pattern": "a:b"}),
    ("length:2-4", {"name": "length", "min": 2, "max": 4}), ("length:-3", {"name": "length", "max": 3}),
    ("length:3-", {"name": "length", "min": 3}),
])
def test_spec_strings(spec, entry):
    assert parse_reward_spec(spec) == entry


@pytest.mark.parametrize("spec", ["length:-", "length:a-b", "exact:x", "regex:", "Exact", "", "length", "regex",
                                  "__import__('os')", "a.b"])
def test_bad_spec_strings(spec):
    with pytest.raises(ConfigError, match="--reward: unknown reward"):
        parse_reward_spec(spec)


def test_specs_build_the_rewards_they_name():
    rewards = build_rewards([parse_reward_spec(s) for s in ("exact", "regex:<r>[a-j]( [a-j])*</r>", "length:2-4")])
    totals, parts = rewards.score([Sample("<r>a b</r>", {"answer": "<r>a b</r>"}), Sample("abc", {"answer": "x"})])
    assert parts == {"exact": [1.0, 0.0], "regex": [1.0, 0.0], "length": [0.0, 1.0]} and totals == [2.0, 1.0]
    with pytest.raises(ConfigError, match=r"rewards\[0\]: .*min \(5\) is larger than max \(2\)"):
        build_rewards([parse_reward_spec("length:5-2")])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.pattern"):
        build_rewards([parse_reward_spec("regex:(")])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.pattern"):
        build_rewards([parse_reward_spec("regex:" + "a" * 2000)])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.name: unknown reward 'bleu'"):
        build_rewards([parse_reward_spec("bleu")])


def test_pass_at_k_is_the_chance_some_of_k_samples_pass():
    """Against the definition: the share of k-subsets of n samples holding a passing one."""
    for n in (1, 4, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100))  # no overflow at large n
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_ks_and_means():
    assert ks_for(1) == [1] and ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6] and ks_for(8) == [1, 2, 4, 8]
    assert mean_pass_at_k([0, 4], 4) == {1: 0.5, 2: 0.5, 4: 0.5}
    assert mean_pass_at_k([1], 2) == {1: 0.5, 2: 1.0}
