"""The `reward_model` reward: a reward checkpoint (train.objective reward) scores GRPO
samples exactly as it scored its training pairs, lazily loaded, verified, and refused with
a clear error when it is not a reward model."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from bastion.data.finetune import load_preferences
from bastion.errors import CheckpointError, ConfigError
from bastion.infer.loading import load_for_inference
from bastion.rewards import Sample, build_reward, build_rewards
from bastion.train.tasks.reward import pair_scores
from synthetic.chat import greeting_preference_records


@pytest.fixture(scope="module")
def rm(reward_run):
    """The session's reward run (tests/conftest.py): 40 steps on greeting pairs; held.jsonl
    holds 24 plain-prompt pairs it never saw."""
    return reward_run


def _samples(records, which):
    return [Sample(completion=r[which], record={"prompt": r["prompt"]}, prompt=r["prompt"]) for r in records]


def _reward(rm, **params):
    reward, _ = build_reward({"name": "reward_model", "checkpoint": str(rm["ckpt"]), "device": "cpu", **params})
    return reward


def test_scores_rank_chosen_above_rejected_and_match_training(rm):
    records = greeting_preference_records(24, seed=9, chat=False)
    reward = _reward(rm, batch_size=5)
    chosen, rejected = reward.score(_samples(records, "chosen")), reward.score(_samples(records, "rejected"))
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(records) >= 0.9
    # The same text layout as training: the task's own scores of these pairs are equal.
    loaded = load_for_inference(rm["ckpt"], head="score")
    data = load_preferences(rm["root"] / "held.jsonl", loaded.chat, loaded.config.finetune, ["/"])
    batch = data.collate([[i] for i in range(len(data))], 128)
    with torch.no_grad():
        trained = pair_scores(loaded.model, batch, data.pad_id)
    assert torch.tensor(chosen) == pytest.approx(trained.chosen, abs=1e-5)
    assert torch.tensor(rejected) == pytest.approx(trained.rejected, abs=1e-5)
    reward.close()


def test_batching_normalising_and_chat_prompts(rm):
    records = greeting_preference_records(6, seed=4)
    samples = [Sample(completion=r["chosen"][0]["content"], record={"messages": r["prompt"]}) for r in records]
    one_by_one = _reward(rm, batch_size=1).score(samples)
    batched = _reward(rm, batch_size=4).score(samples)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    squashed = _reward(rm, normalize="sigmoid").score(samples)
    assert squashed == pytest.approx([1 / (1 + math.exp(-s)) for s in one_by_one], abs=1e-6)
    # Sample.prompt alone (no record) is one user message, like a string "prompt".
    bare = [Sample(completion=s.completion, prompt=r["prompt"][0]["content"]) for s, r in zip(samples, records)]
    assert _reward(rm).score(bare) == pytest.approx(one_by_one, abs=1e-5)
    # Longer than max_tokens: the last tokens are kept, still a finite score.
    assert all(math.isfinite(s) for s in _reward(rm, max_tokens=8).score(samples))


def test_loaded_lazily_and_released(rm, tmp_path):
    reward, _ = build_reward({"name": "reward_model", "checkpoint": str(tmp_path / "missing")})
    assert reward._loaded is None  # building (config validation) reads nothing
    with pytest.raises(CheckpointError, match="not found"):
        reward.score([Sample(completion="hi", prompt="greet x")])
    good = _reward(rm)
    good.score([Sample(completion="Hello, x! Nice to meet you.", prompt="greet x")])
    assert good._loaded is not None
    good.close()
    assert good._loaded is None


def test_refuses_language_models_and_tampered_checkpoints(rm, tmp_path):
    lm, _ = build_reward({"name": "reward_model", "checkpoint": str(rm["base"])})
    with pytest.raises(CheckpointError, match="reward_model.checkpoint .* not a reward model"):
        lm.score([Sample(completion="hi", prompt="greet x")])
    copy = tmp_path / "copy"
    shutil.copytree(rm["ckpt"], copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text() + "\n# edited\n")
    tampered, _ = build_reward({"name": "reward_model", "checkpoint": str(copy)})
    with pytest.raises(CheckpointError, match="config.yaml"):
        tampered.score([Sample(completion="hi", prompt="greet x")])


@pytest.mark.parametrize("spec,field", [
    ({}, "checkpoint"),
    ({"checkpoint": "x", "model": "gpt"}, "model"),
    ({"checkpoint": "x", "batch_size": 0}, "batch_size"),
    ({"checkpoint": "x", "batch_size": 100_000}, "batch_size"),
    ({"checkpoint": "x", "normalize": "tanh"}, "normalize"),
    ({"checkpoint": "x", "device": "tpu"}, "device"),
    ({"checkpoint": "x", "max_tokens": 2}, "max_tokens"),
])
def test_bad_params_name_the_field(spec, field):
    with pytest.raises(ConfigError, match=rf"rewards\[0\]\.{field}"):
        build_rewards([{"name": "reward_model", **spec}])
