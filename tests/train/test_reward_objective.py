"""train.objective: reward - a reward model (score head, Bradley-Terry) from a tiny language
model on separable synthetic pairs; its checkpoints, resume and refusals."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import finetune_config, tiny_config

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import checkpoint_config, load_full_model
from bastion.errors import CheckpointError, ConfigError
from bastion.eval.finetune import eval_preferences
from bastion.infer.loading import load_for_inference
from bastion.model.heads import sequence_scores
from bastion.train.loop import train
from bastion.train.tasks.reward import PairScores, reward_loss


@pytest.fixture(scope="module")
def rm(reward_run):
    """The session's reward run (tests/conftest.py): 40 steps on greeting pairs whose chosen reply
    always carries the marker "Nice to meet you" (the rejected one is rude), validated on 64 more."""
    return reward_run


def _config(rm, out, **train_settings):
    settings = {"max_steps": 40, "batch_size": 8, "lr": 3e-3, **train_settings}
    return finetune_config(rm["base"], rm["root"] / "pref.jsonl", out, objective="reward", **settings)


def test_reward_model_separates_chosen_from_rejected(rm):
    result = rm["result"]
    # val accuracy of an untrained (zero) head is 0: every margin is exactly 0, not > 0
    assert result.val_metrics["reward_accuracy"] >= 0.9, result.val_metrics
    assert result.val_metrics["reward_margin"] > 0
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero head: every reward 0
    assert result.losses[-1] < 0.3
    assert "reward accuracy" in result.val_summary


def test_reward_checkpoint_records_the_head_and_reloads(rm):
    path = rm["result"].checkpoint
    ckpt = load_checkpoint(path, verify=True, load_optimizer=False)
    assert "score.weight" in ckpt.model and "output.weight" not in ckpt.model
    assert tuple(ckpt.model["score.weight"].shape) == (1, 64)
    assert checkpoint_config(ckpt).model.score_labels == 1
    assert ckpt.trainer_state["objective"] == "reward"
    loaded = load_for_inference(path, head="score")
    assert loaded.model.cfg.score_labels == 1 and not hasattr(loaded.model, "output")
    ids = torch.tensor([loaded.chat.encode_conversation(
        [{"role": "user", "content": "greet zorbu"}, {"role": "assistant", "content": "Hello, zorbu! Nice to meet you."}]
    )[0]])
    assert sequence_scores(loaded.model, ids, loaded.tokenizer.pad_id).shape == (1, 1)


def test_bradley_terry_loss_matches_hand_computation():
    scores = PairScores(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]))
    by_hand = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    loss, stats = reward_loss(scores)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert stats["reward_accuracy"].item() == 0.5 and stats["reward_margin"].item() == pytest.approx(0.0)
    centred, _ = reward_loss(scores, center_coef=0.1)  # + 0.1 * mean((1 + 0)^2, (-0.5 + 0.5)^2)
    assert centred.item() == pytest.approx(by_hand + 0.1 * 0.5, abs=1e-6)
    smoothed, _ = reward_loss(scores, label_smoothing=0.1)
    z = torch.tensor([1.0, -1.0])
    expected = (0.9 * -torch.nn.functional.logsigmoid(z) + 0.1 * -torch.nn.functional.logsigmoid(-z)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), abs=1e-6)


def test_reward_resume_is_exact(rm, tmp_path):
    straight = train(_config(rm, tmp_path / "a", max_steps=8, batch_size=4, log_every=1), quiet=True)
    first = train(_config(rm, tmp_path / "b", max_steps=8, batch_size=4, log_every=1), quiet=True,
                  should_stop=lambda step: step == 3)
    second = train(_config(rm, tmp_path / "b", max_steps=8, batch_size=4, log_every=1), resume=True, quiet=True)
    assert first.steps == 3
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)


def test_eval_preferences_scores_a_reward_checkpoint(rm):
    out = eval_preferences(rm["result"].checkpoint, rm["root"] / "val.jsonl", roots=["/"])
    assert out["reward_accuracy"] >= 0.9 and out["pairs"] == 64
    assert out["reward_accuracy"] == pytest.approx(rm["result"].val_metrics["reward_accuracy"])
    with pytest.raises(ConfigError, match="--reference"):
        eval_preferences(rm["result"].checkpoint, rm["root"] / "val.jsonl", roots=["/"], reference=rm["base"])


def test_continuing_from_a_reward_checkpoint_keeps_its_head(rm, tmp_path):
    cfg = finetune_config(rm["result"].checkpoint, rm["root"] / "pref.jsonl", tmp_path / "more", objective="reward",
                          max_steps=1, batch_size=4)
    assert train(cfg, quiet=True).losses[0] < 0.3  # starts where the trained head left off, not at log 2


def test_reward_checkpoints_are_refused_where_a_language_model_is_needed(rm, tmp_path):
    path = rm["result"].checkpoint
    with pytest.raises(CheckpointError, match="cannot generate"):
        load_for_inference(path)
    with pytest.raises(CheckpointError, match="cannot generate"):
        load_full_model(path)
    with pytest.raises(CheckpointError, match="no lm head; train.objective sft needs a language model"):
        train(finetune_config(path, rm["root"] / "pref.jsonl", tmp_path / "sft", objective="sft"), quiet=True)
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_for_inference(rm["base"], head="score")


def test_reward_objective_refuses_lora_and_clm_refuses_a_head(rm, tmp_path):
    with pytest.raises(ConfigError, match="finetune.lora.enabled"):
        train(_config(rm, tmp_path / "lora", lora={"rank": 2}), quiet=True)
    assert not (tmp_path / "lora" / "checkpoints").exists()


def test_pretraining_refuses_a_score_head(arithmetic_data, tmp_path):
    cfg = tiny_config(arithmetic_data, tmp_path / "clm")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"score_labels": 1})})
    with pytest.raises(ConfigError, match="model.score_labels"):
        train(cfg, quiet=True)
