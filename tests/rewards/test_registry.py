"""The registry with the built-ins loaded: weighted sums, config errors naming rewards[i]
and the field, configs that try to carry code, entry-point rewards from an installed
(here: fake) distribution, and built-ins that no package can replace."""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from bastion.cli import app
from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.rewards import REWARDS, Sample, build_rewards, entry_point_names, reward_class

runner = CliRunner()


def test_weighted_sum_and_each_part():
    rewards = build_rewards([{"name": "exact", "weight": 2.0}, {"name": "length", "max": 3, "weight": -0.5},
                             {"name": "length", "min": 1}])
    samples = [Sample("abc", {"answer": "abc"}), Sample("abcd", {"answer": "x"}), Sample("", {"answer": ""})]
    totals, parts = rewards.score(samples)
    assert parts == {"exact": [1.0, 0.0, 1.0], "length": [1.0, 0.0, 1.0], "length#2": [1.0, 1.0, 0.0]}
    assert totals == [2.0 - 0.5 + 1.0, 1.0, 2.0 - 0.5]
    rewards.close()


@pytest.mark.parametrize("specs,loc", [
    ([{"name": "exact"}, {"name": "bleu"}], "rewards[1].name"),
    ([{"name": "exact"}, {"name": "regex", "pattern": "a", "code": "import os"}], "rewards[1].code"),
    ([{"name": "length", "min": -1}], "rewards[0].min"),
    ([{"name": "math", "timeout_s": 1e9}], "rewards[0].timeout_s"),
    ([{"name": "exact", "weight": 1000}], "rewards[0].weight"),
])
def test_config_errors_name_the_entry_and_field(specs, loc):
    with pytest.raises(ConfigError) as info:
        build_rewards(specs)
    assert [p[0] for p in info.value.problems] == [loc] and str(info.value).startswith(loc)


@pytest.mark.parametrize("entry", [{"name": "__import__('os').system('id')"}, {"name": "os.system"},
                                   {"name": "bastion.rewards.builtin:ExactReward"}])
def test_a_config_cannot_name_code(entry):
    with pytest.raises(ConfigError, match=r"rewards\.0\.name|rewards\[0\]\.name"):
        build_config({"rewards": [entry]})


def test_config_validate_reports_every_reward_problem(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"rewards": [{"name": "math"}, {"name": "regex", "pattern": "("},
                                                  {"name": "nope"}, {"name": "regex", "pattern": "a", "code": "x"}]}))
    result = runner.invoke(app, ["config", "validate", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "error:" in line]
    assert [line.split(": ")[2] for line in lines] == ["rewards[1].pattern", "rewards[2].name", "rewards[3].code"]
    config.write_text(yaml.safe_dump({"rewards": [{"name": "math"}, {"name": "format", "weight": 0.2}]}))
    result = runner.invoke(app, ["config", "validate", str(config)])
    assert result.exit_code == 0, result.output


# ---- entry points -----------------------------------------------------------------------------


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """An installed distribution "fakerewards" declaring entry points in bastion.rewards:
    a good reward, one that tries to replace `exact`, and one that is not a Reward."""
    pkg = tmp_path / "fakerewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from bastion.rewards import Reward
        from pydantic import Field

        class Shout(Reward):
            """1 if the completion is in capitals (a third-party reward)."""
            name = "shout"

            class Params(Reward.Params):
                min_chars: int = Field(default=1, ge=1, le=100)

            def score_one(self, sample):
                return float(len(sample.completion) >= self.params.min_chars and sample.completion.isupper())

        class Impostor(Reward):
            name = "exact"

            def score_one(self, sample):
                return 1.0

        not_a_reward = print
    '''))
    meta = tmp_path / "fakerewards-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: fakerewards\nVersion: 1.0\n")
    (meta / "entry_points.txt").write_text("[bastion.rewards]\nshout = fakerewards:Shout\n"
                                           "exact = fakerewards:Impostor\nbroken = fakerewards:not_a_reward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(before)
    sys.modules.pop("fakerewards", None)


def test_entry_point_reward_is_loaded_when_named(fake_dist):
    assert {"shout", "exact", "broken"} <= set(entry_point_names())
    rewards = build_rewards([{"name": "shout", "min_chars": 3}])
    assert rewards.score([Sample("HEY"), Sample("hey"), Sample("HI")])[0] == [1.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.min_chars"):
        build_rewards([{"name": "shout", "min_chars": 0}])
    with pytest.raises(ConfigError, match="is not a bastion Reward class"):
        build_rewards([{"name": "broken"}])


def test_a_builtin_cannot_be_shadowed(fake_dist):
    from bastion.rewards.builtin import ExactReward

    assert reward_class("exact") is ExactReward
    rewards = build_rewards([{"name": "exact"}])
    assert rewards.score([Sample("no", {"answer": "yes"})])[0] == [0.0]  # the impostor would say 1
    assert "fakerewards" not in sys.modules  # never even imported


def test_eval_rewards_lists_builtins_and_entry_points(fake_dist):
    result = runner.invoke(app, ["eval", "rewards"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in ("exact", "math", "json_schema", "overlong", "shout"):
        assert f"│ {name} " in result.output
    assert "min_chars: int = 1" in result.output and "pattern: str = required" in result.output
    assert "capitals (a third-party reward). [fakerewards]" in result.output
    assert "cannot load" in result.output  # "broken" is listed with why
