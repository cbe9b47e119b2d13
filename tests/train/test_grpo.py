"""GRPO and its variants: the losses against hand-computed numbers, and the task in the real
loop (rewards rise, LoRA with the adapters-off reference, exact resume with reused rollouts,
bad configs refused). The 2-rank test is in test_grpo_distributed.py."""
import json
import math

import pytest
import torch

from bastion.checkpoint import load_checkpoint
from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.model.lora import apply_lora, lora_disabled
from bastion.rewards import REWARDS, Reward
from bastion.train import train
from bastion.train.tasks.grpo import (
    group_advantages,
    policy_loss,
    token_kl,
    token_logprobs,
    token_losses,
    varied_groups,
)
from helpers import finetune_config, lora_test_config, lora_test_model, make_base_checkpoint
from synthetic.chat import write_jsonl

# ---- the losses, by hand ----------------------------------------------------------------------
# Two completions, token ratios (1, 1.5, 0.5); the second's last token is padding.
LOGP = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]))
OLD = torch.zeros(2, 3)
MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])


def loss(variant, eps_high=0.2, **kw):
    return float(policy_loss(LOGP, OLD, ADV, MASK, variant=variant, eps_low=0.2, eps_high=eps_high,
                             max_new_tokens=4, **kw))


def test_token_level_clipping_by_hand():
    # A=+1: -min(r, clip r) = -1, -1.2 (clipped at 1+eps), -0.5 (min keeps r below 1-eps)
    # A=-1: max(r, clip r) = 1, 1.5 (pessimistic: unclipped), padding 0
    losses, clipped = token_losses(LOGP, OLD, ADV, MASK, variant="grpo", eps_low=0.2, eps_high=0.2)
    assert torch.allclose(losses, torch.tensor([[-1.0, -1.2, -0.5], [1.0, 1.5, 0.0]]))
    assert clipped.tolist() == [[False, True, False], [False, False, False]]


def test_each_variant_normalises_as_its_paper_says():
    assert loss("grpo") == pytest.approx((-2.7 / 3 + 2.5 / 2) / 2)  # per-completion mean, then mean: 0.175
    assert loss("dapo") == pytest.approx((-2.7 + 2.5) / 5)  # token-level mean over the batch: -0.04
    assert loss("dr_grpo") == pytest.approx((-2.7 + 2.5) / (2 * 4))  # / (completions x max_new_tokens)
    # clip-higher: the positive-advantage token at 1.5 is clipped at 1.28 instead of 1.2
    assert loss("dapo", eps_high=0.28) == pytest.approx((-1 - 1.28 - 0.5 + 1 + 1.5) / 5)
    # GSPO: one ratio per completion, exp(mean log r): 0.75^(1/3) (inside the clip) and sqrt(1.5)
    s0, s1 = 0.75 ** (1 / 3), math.sqrt(1.5)
    assert loss("gspo") == pytest.approx((-s0 + max(s1, 1.2)) / 2)
    assert loss("gspo", eps_high=0.1) == pytest.approx((-s0 + s1) / 2)  # A<0: clipping never lowers the loss


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    plain = group_advantages(rewards, 2, scale=False)
    assert plain.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]
    scaled = group_advantages(rewards, 2, scale=True)
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    a = 0.5 / (std + 1e-4)
    assert scaled[:4].tolist() == pytest.approx([a, -a, -a, a])
    assert scaled[4:].tolist() == [0.0, 0.0]  # equal rewards: no signal, no division blow-up
    assert varied_groups(rewards, 2).tolist() == [True, True, False]


def test_kl_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.equal(token_kl(logp, logp), torch.zeros(3))
    ref = torch.log(torch.tensor([0.3, 0.5, 0.6]))
    d = ref - logp
    assert torch.allclose(token_kl(logp, ref), torch.exp(d) - d - 1) and (token_kl(logp, ref)[[0, 2]] > 0).all()
    with_kl = policy_loss(LOGP, OLD, ADV, MASK, variant="grpo", eps_low=0.2, eps_high=0.2, max_new_tokens=4,
                          kl_coef=0.5, ref_logp=LOGP)
    assert float(with_kl) == pytest.approx(loss("grpo"))  # policy = reference: the KL term adds nothing


def test_lora_reference_is_the_base_with_adapters_off():
    model = lora_test_model()
    ids = torch.randint(0, 97, (2, 10))
    base = token_logprobs(model, ids, 1.0)
    apply_lora(model, lora_test_config().finetune.lora.model_copy(update={"rank": 4}))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the outputs
    assert not torch.allclose(token_logprobs(model, ids, 1.0), base)
    with lora_disabled(model):
        assert torch.allclose(token_logprobs(model, ids, 1.0), base)
    assert not torch.allclose(token_logprobs(model, ids, 1.0), base)  # back on after the block


# ---- the task in the loop -----------------------------------------------------------------------


class HasLetterA(Reward):
    """1 when the completion contains the letter "a" (a random model does so about a third of the time)."""

    name = "test_has_a"

    def score_one(self, sample):
        return float("a" in sample.completion)


@pytest.fixture(autouse=True)
def test_reward(monkeypatch):
    monkeypatch.setitem(REWARDS, HasLetterA.name, HasLetterA)  # registered for these tests only


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    words = ["abc", "def", "ghi", "jab", "cab", "bad", "fig", "hid"]
    return {"base": make_base_checkpoint(root / "base"),
            "train": write_jsonl(root / "prompts.jsonl", [{"prompt": f"reverse: {w}", "answer": w} for w in words * 3]),
            "val": write_jsonl(root / "val.jsonl", [{"prompt": f"reverse: {w}"} for w in words[:4]])}


def grpo_config(data, out, *, grpo=None, rewards=None, lora=None, **train_settings):
    settings = {"batch_size": 4, "max_steps": 10, "lr": 1e-2, "warmup_steps": 0, "log_every": 1, "eval_every": 10,
                "eval_batches": 1, "threads": 1, **train_settings}
    cfg = finetune_config(data["base"], data["train"], out, objective="grpo", val_file=data["val"], lora=lora,
                          **settings).model_dump()
    cfg["grpo"] = {"group_size": 8, "max_new_tokens": 8, **(grpo or {})}
    cfg["rewards"] = rewards or [{"name": HasLetterA.name}]
    return build_config(cfg)


def train_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward(data, tmp_path):
    result = train(grpo_config(data, tmp_path / "run"), quiet=True)
    rewards = [m["reward"] for m in train_metrics(result.run_dir) if m["kind"] == "train"]
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, rewards  # seeded: ~0.46 -> ~0.9
    assert result.val_metrics["reward"] >= 0.75 and result.val_metrics["loss"] == -result.val_metrics["reward"]


@pytest.mark.parametrize("variant", ["dr_grpo", "dapo", "gspo"])
def test_every_variant_learns(data, tmp_path, variant):
    grpo = {"loss": variant, **({"epsilon": 4e-3} if variant == "gspo" else {})}
    result = train(grpo_config(data, tmp_path / "run", grpo=grpo, max_steps=8), quiet=True)
    rows = [m for m in train_metrics(result.run_dir) if m["kind"] == "train"]
    assert sum(m["reward"] for m in rows[-3:]) / 3 > sum(m["reward"] for m in rows[:3]) / 3 + 0.15
    if variant == "dapo":
        assert all(0 < m["groups_kept"] <= 1 for m in rows)


def test_lora_with_kl_starts_at_zero_kl_and_moves_away(data, tmp_path):
    cfg = grpo_config(data, tmp_path / "run", grpo={"kl_coef": 0.1}, lora={"rank": 8, "alpha": 16}, lr=3e-2,
                      max_steps=6)
    result = train(cfg, quiet=True)
    kl = [m["kl"] for m in train_metrics(result.run_dir) if m["kind"] == "train"]
    assert kl[0] == 0.0  # LoRA B starts at zero: the policy is the reference
    assert kl[-1] > 0.0
    assert result.adapter is not None


def test_resume_with_reused_rollouts_is_exact(data, tmp_path):
    # num_iterations 2 x grad_accum 2: stopping after step 3 leaves rollouts half used
    cfg = grpo_config(data, tmp_path / "a", grpo={"num_iterations": 2, "group_size": 4, "max_new_tokens": 6},
                      grad_accum=2, batch_size=2, max_steps=6)
    first = train(cfg, quiet=True, should_stop=lambda step: step == 3)
    assert first.steps == 3
    state = load_checkpoint(first.checkpoint, load_optimizer=False).trainer_state["sampler"]
    assert state["calls"] == 6 and len(state["buffer"]) == 2
    resumed = train(cfg, resume=True, quiet=True)
    straight = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": str(tmp_path / "b")})}),
                     quiet=True)
    assert resumed.steps == straight.steps == 6
    assert resumed.losses == straight.losses[3:]
    a = [m for m in train_metrics(tmp_path / "a") if m["kind"] == "train"]
    b = [m for m in train_metrics(tmp_path / "b") if m["kind"] == "train"]
    assert [(m["reward"], m["clip_fraction"]) for m in a] == [(m["reward"], m["clip_fraction"]) for m in b]
    assert any(m["clip_fraction"] > 0 for m in b)  # the reused rollouts were off-policy: the clip acted


def test_bad_configs_are_refused_clearly(data, tmp_path):
    with pytest.raises(ConfigError, match=r"rewards\[0\].name: unknown reward 'no_such_reward'"):
        train(grpo_config(data, tmp_path / "x", rewards=[{"name": "no_such_reward"}]), quiet=True)
    with pytest.raises(ConfigError, match="rewards"):  # code is not a reward name
        grpo_config(data, tmp_path / "x", rewards=[{"name": "__import__('os').system('id')"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\].code"):  # nor a parameter
        train(grpo_config(data, tmp_path / "x", rewards=[{"name": HasLetterA.name, "code": "print(1)"}]), quiet=True)
    with pytest.raises(ConfigError, match="grpo.max_new_tokens"):
        train(grpo_config(data, tmp_path / "x", grpo={"max_new_tokens": 2000}), quiet=True)
    with pytest.raises(ConfigError, match="grpo.max_new_tokens"):  # prompt + completion past the context (128)
        train(grpo_config(data, tmp_path / "x", grpo={"max_new_tokens": 125}), quiet=True)
    cfg = grpo_config(data, tmp_path / "x").model_dump()
    cfg["rewards"] = []
    with pytest.raises(ConfigError, match="needs at least one reward"):
        train(build_config(cfg), quiet=True)
