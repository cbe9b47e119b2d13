"""`bastion eval generate` with registered rewards: K samples per prompt and pass@k by the
formula, what rewards see of each sample, rewards from a config (-c). A tiny random model
(nothing downloaded): its completions are noise, which is all a text-only reward needs."""
from __future__ import annotations

import json
from math import comb

import pytest
import yaml
from helpers import make_base_checkpoint
from typer.testing import CliRunner

from bastion.cli import app
from bastion.errors import ConfigError
from bastion.eval.finetune import eval_generate
from bastion.rewards import REWARDS, Reward, register_reward

runner = CliRunner()
K = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = make_base_checkpoint(root / "base")
    records = [{"prompt": f"reverse: {w}", "answer": w, "id": i} for i, w in enumerate(["a b", "c d e", "f", "g h"])]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, base


def run(setup, rewards, **kwargs):
    root, base = setup
    return eval_generate(base, root / "p.jsonl", rewards, roots=[str(root)], max_new_tokens=8, threads=1,
                         keep_samples=1000, **kwargs)


def pass_at(n: int, c: int, k: int) -> float:
    return 1 - comb(n - c, k) / comb(n, k)


def test_samples_and_pass_at_k_follow_the_formula(setup):
    first = run(setup, [{"name": "length", "min": 0}], samples=K, temperature=1.0, seed=5)
    assert first.n == 4 and first.samples_per_prompt == K and len(first.samples) == 4 * K
    lengths = sorted(len(s["completion"]) for s in first.samples)
    cut = lengths[len(lengths) // 2]  # about half the completions are at most this long
    result = run(setup, [{"name": "length", "max": cut}], samples=K, temperature=1.0, seed=5)
    assert [s["completion"] for s in result.samples] == [s["completion"] for s in first.samples]  # seeded
    passes = [sum(len(s["completion"]) <= cut for s in result.samples[i * K:(i + 1) * K]) for i in range(4)]
    assert 0 < sum(passes) < 4 * K
    assert list(result.pass_at_k) == [1, 2, 4, 6]
    for k, value in result.pass_at_k.items():
        assert value == pytest.approx(sum(pass_at(K, c, k) for c in passes) / 4)
    assert result.mean["reward"] == result.mean["length"] == pytest.approx(sum(passes) / (4 * K))
    # Samples of one prompt differ (seed + i * K + j), and the threshold moves pass@k.
    assert len({s["completion"] for s in result.samples[:K]}) > 1
    stricter = run(setup, [{"name": "length", "max": cut}], samples=K, temperature=1.0, seed=5, pass_threshold=1.5)
    assert set(stricter.pass_at_k.values()) == {0.0}


def test_samples_need_a_temperature(setup):
    with pytest.raises(ConfigError, match="--samples 4 needs --temperature > 0"):
        run(setup, [{"name": "exact"}], samples=4)


@pytest.fixture
def spy():
    """A reward that records every Sample it is given."""
    seen = []

    @register_reward
    class Spy(Reward):
        name = "spy_for_tests"

        def score_one(self, sample):
            seen.append(sample)
            return 0.5

    yield seen
    REWARDS.pop("spy_for_tests")


def test_rewards_see_the_record_and_the_generation(setup, spy):
    result = run(setup, [{"name": "spy_for_tests", "weight": 2.0}, {"name": "overlong", "buffer": 4}],
                 samples=2, temperature=1.0)
    assert [s.record["id"] for s in spy] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(s.prompt.startswith("reverse: ") and s.max_new_tokens == 8 for s in spy)
    assert all(1 <= s.completion_tokens <= 8 for s in spy)
    assert all((s.finish_reason == "length") == (s.completion_tokens == 8) for s in spy)
    for sample, kept in zip(spy, result.samples):  # the total is the weighted sum of the parts
        assert kept["completion"] == sample.completion
        assert kept["reward"] == pytest.approx(2.0 * 0.5 + kept["overlong"])
        assert kept["overlong"] == (-1.0 if sample.finish_reason == "length"
                                    else -max(0, sample.completion_tokens - 4) / 4)


def test_cli_config_rewards_and_samples(setup, monkeypatch):
    root, base = setup
    monkeypatch.chdir(root)
    (root / "r.yaml").write_text(yaml.safe_dump({"rewards": [{"name": "length", "min": 0, "weight": 0.5},
                                                             {"name": "exact", "weight": 0.25}]}))
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", str(base), "--file", "p.jsonl", "-c", "r.yaml",
                                 "--reward", "regex:.*", "--samples", "2", "--temperature", "1", "--max-new-tokens",
                                 "4", "--threads", "1", "--json", "out.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "out.json").read_text())
    assert set(report["mean"]) == {"reward", "regex", "length", "exact"} and report["samples_per_prompt"] == 2
    assert list(report["pass_at_k"]) == ["1", "2"] and "pass@2" in result.output
    for s in report["samples"]:  # regex .* and length >= 0 always score 1
        assert s["reward"] == pytest.approx(1.0 + 0.5 + 0.25 * s["exact"])
    (root / "bad.yaml").write_text(yaml.safe_dump({"rewards": [{"name": "regex", "pattern": "("}]}))
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", str(base), "--file", "p.jsonl", "-c", "bad.yaml"])
    assert result.exit_code == 2 and "rewards[0].pattern" in result.output
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", str(base), "--file", "p.jsonl"])
    assert result.exit_code == 2 and "name a reward" in result.output
