"""ORPO and KTO: their losses against numbers worked out here with plain math, tiny runs that
learn separable greetings (polite vs rude) from a random base, exact resume (full and LoRA),
and the config and data errors they raise."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import finetune_config, make_base_checkpoint

from bastion.checkpoint import load_checkpoint
from bastion.config import build_config
from bastion.errors import BastionError, ConfigError, DataError
from bastion.model.lora import is_lora_name
from bastion.train.loop import train
from bastion.train.tasks import task_class
from bastion.train.tasks.kto import kl_reference_point, kto_losses, kto_stats
from bastion.train.tasks.orpo import log1mexp, orpo_loss
from bastion.train.tasks.preference import SequenceLogprobs
from synthetic.chat import greeting_kto_records, greeting_preference_records, write_jsonl


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- losses by hand ----------------------------------------------------------------------------


def test_log1mexp_is_accurate_near_zero_and_far_from_it() -> None:
    x = torch.tensor([-50.0, -3.0, -0.5, -1e-3, -1e-5], dtype=torch.float64)
    want = [math.log(-math.expm1(v)) for v in x.tolist()]
    assert log1mexp(x).tolist() == pytest.approx(want, rel=1e-9)
    # a response the model is certain of: clamped, finite value and finite gradient
    x = torch.tensor([0.0, -1e-12], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert float(y[0].detach()) == pytest.approx(math.log(-math.expm1(-1e-6)), rel=1e-4)


def test_orpo_loss_matches_the_formula_by_hand() -> None:
    # two pairs: summed log-probs and token counts of chosen and rejected responses
    policy = SequenceLogprobs(chosen=torch.tensor([-2.0, -6.0]), rejected=torch.tensor([-3.0, -1.0]),
                              chosen_tokens=torch.tensor([4, 3]), rejected_tokens=torch.tensor([2, 4]))
    lam = 0.5
    losses, ratios = [], []
    for c, r in [(-2.0 / 4, -3.0 / 2), (-6.0 / 3, -1.0 / 4)]:
        log_odds_c = c - math.log(1 - math.exp(c))
        log_odds_r = r - math.log(1 - math.exp(r))
        ratio = log_odds_c - log_odds_r
        ratios.append(ratio)
        losses.append(-c + lam * math.log(1 + math.exp(-ratio)))
    loss, stats = orpo_loss(policy, lam=lam)
    assert float(loss) == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert float(stats["log_odds_ratio"]) == pytest.approx(sum(ratios) / 2, rel=1e-6)
    assert float(stats["nll"]) == pytest.approx((0.5 + 2.0) / 2, rel=1e-6)
    assert float(stats["reward_accuracy"]) == 0.5  # pair 1: -0.5 > -1.5; pair 2: -2 < -0.25
    assert float(stats["reward_chosen"]) == pytest.approx(lam * (-0.5 - 2.0) / 2)
    assert float(stats["reward_margin"]) == pytest.approx(lam * ((-0.5 + 1.5) + (-2.0 + 0.25)) / 2)


def test_kto_loss_matches_the_formula_by_hand() -> None:
    policy = torch.tensor([-4.0, -9.0, -5.0])
    reference = torch.tensor([-5.0, -8.0, -5.5])  # r = 1, -1, 0.5
    desirable = torch.tensor([True, False, False])
    beta, wd, wu, z0 = 0.5, 1.5, 2.0, 0.3
    rows = kto_losses(policy, reference, desirable, torch.tensor(z0), beta=beta, desirable_weight=wd,
                      undesirable_weight=wu)
    want = [wd * (1 - _sigmoid(beta * (1 - z0))), wu * (1 - _sigmoid(beta * (z0 + 1))),
            wu * (1 - _sigmoid(beta * (z0 - 0.5)))]
    assert rows.losses.tolist() == pytest.approx(want, rel=1e-6)
    stats = kto_stats(rows)
    # on the label's side of z0: row 0 (1 > 0.3) yes, row 1 (-1 < 0.3) yes, row 2 (0.5 > 0.3, undesirable) no
    assert float(stats["reward_accuracy"]) == pytest.approx(2 / 3)
    assert float(stats["reward_margin"]) == pytest.approx(beta * ((1 - z0) + (z0 + 1) + (z0 - 0.5)) / 3, rel=1e-6)
    assert float(stats["kl"]) == pytest.approx(z0)


def test_kto_reference_point_is_a_clamped_detached_mean() -> None:
    ratios = torch.tensor([0.5, -2.0, 4.5], requires_grad=True)
    z0 = kl_reference_point(ratios)
    assert float(z0) == pytest.approx(1.0) and not z0.requires_grad
    assert float(kl_reference_point(torch.tensor([-1.0, -3.0]))) == 0.0  # clamped at 0


# ---- tiny runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A random base and polite-vs-rude greetings as preference pairs and as KTO completions
    (the pairs unpaired: the polite reply true, the rude one false)."""
    root = tmp_path_factory.mktemp("orpo-kto")
    write_jsonl(root / "pref.jsonl", greeting_preference_records(96, seed=1))
    write_jsonl(root / "pref_val.jsonl", greeting_preference_records(16, seed=7))
    write_jsonl(root / "kto.jsonl", greeting_kto_records(192, seed=1))
    write_jsonl(root / "kto_val.jsonl", greeting_kto_records(32, seed=7))
    return {"root": root, "base": make_base_checkpoint(root / "base")}


def _config(data, out, objective, **settings):
    name = "pref" if objective == "orpo" else "kto"
    defaults = dict(objective=objective, val_file=data["root"] / f"{name}_val.jsonl", max_steps=16, lr=3e-3,
                    batch_size=8, eval_every=16, eval_batches=4, log_every=1, threads=1)
    return finetune_config(data["base"], data["root"] / f"{name}.jsonl", out, **(defaults | settings))


def _train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_orpo_learns_to_prefer_the_polite_greeting(data, tmp_path) -> None:
    result = train(_config(data, tmp_path / "orpo", "orpo", preference={"orpo_lambda": 1.0}), quiet=True)
    rows = _train_rows(tmp_path / "orpo")
    early = sum(r["reward_accuracy"] for r in rows[:3]) / 3
    assert result.losses[-1] < result.losses[0] - 1.0
    assert result.val_metrics["reward_accuracy"] >= early + 0.3, (early, result.val_metrics)
    assert result.val_metrics["reward_accuracy"] >= 0.9 and result.val_metrics["log_odds_ratio"] > 1.0
    assert {"nll", "log_odds_ratio", "odds_ratio_loss", "reward_margin"} <= set(rows[-1])
    assert list(result.val_metrics)[0] == "loss" and "nll" in result.val_summary


def test_kto_learns_to_reward_the_desirable_completions(data, tmp_path) -> None:
    result = train(_config(data, tmp_path / "kto", "kto", preference={"beta": 0.1}), quiet=True)
    # Step 1: the policy is the reference, every r and z0 are 0, each completion's loss is 1 - sigmoid(0).
    assert result.losses[0] == pytest.approx(0.5, abs=1e-5)
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.1, result.losses
    val = result.val_metrics
    assert list(val)[0] == "loss" and val["examples"] == 32 and val["desirable"] == val["undesirable"] == 16
    assert val["reward_desirable"] > val["reward_undesirable"] + 0.5, val
    assert val["reward_accuracy"] >= 0.75 and val["reward_margin"] > 0.1, val
    rows = _train_rows(tmp_path / "kto")
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] >= 0.0
    assert {"kl", "reward_accuracy", "reward_margin"} <= set(rows[-1])


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_resume_is_exact_with_lora(data, tmp_path, objective) -> None:
    lora = {"rank": 4, "alpha": 8}

    def cfg(out):
        return _config(data, out, objective, max_steps=8, eval_every=8, lora=lora)

    straight = train(cfg(tmp_path / "a"), quiet=True)
    first = train(cfg(tmp_path / "b"), quiet=True, should_stop=lambda step: step == 4)
    assert first.steps == 4 and first.stopped_by == "callback"
    second = train(cfg(tmp_path / "b"), resume=True, quiet=True)
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second.val_metrics["loss"] == pytest.approx(straight.val_metrics["loss"], abs=1e-6)
    assert straight.losses[-1] < straight.losses[0]
    saved = load_checkpoint(straight.checkpoint, load_optimizer=False)
    assert saved.model and all(is_lora_name(k) for k in saved.model)  # LoRA: only adapters trained


# ---- errors ------------------------------------------------------------------------------------


def test_config_keys_are_bounded_and_unknown_ones_refused() -> None:
    base = {"train": {"objective": "kto"}, "finetune": {"init_from": "x", "train_file": "y"}}
    cfg = build_config(base | {"finetune": base["finetune"] | {"preference": {
        "orpo_lambda": 0.2, "kto_desirable_weight": 1.33, "kto_undesirable_weight": 0.5}}})
    assert cfg.finetune.preference.kto_desirable_weight == 1.33 and task_class("kto").objective == "kto"
    assert task_class("orpo").objective == "orpo"
    for bad, field in [({"orpo_lambda": 0}, "orpo_lambda"), ({"kto_desirable_weight": -1}, "kto_desirable_weight"),
                       ({"kto_undesirable_weight": 1e9}, "kto_undesirable_weight"),
                       ({"kto_lambda": 1.0}, "kto_lambda"), ({"orpo_beta": 1.0}, "orpo_beta")]:
        with pytest.raises(BastionError, match=rf"finetune.preference.{field}"):
            build_config(base | {"finetune": base["finetune"] | {"preference": bad}})


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_label_smoothing_is_refused_before_anything_is_written(data, tmp_path, objective) -> None:
    cfg = _config(data, tmp_path / "run", objective, preference={"label_smoothing": 0.1})
    with pytest.raises(ConfigError, match=f"label_smoothing: applies to dpo and simpo; {objective} has no"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def test_kto_refuses_bad_files_with_file_and_line(data, tmp_path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", greeting_kto_records(4, seed=3)
                      + [{"prompt": "greet bo", "completion": "Hi", "label": "false"},
                         {"prompt": "greet bo", "label": True}])
    with pytest.raises(DataError) as info:
        train(finetune_config(data["base"], bad, tmp_path / "r1", objective="kto"), quiet=True)
    assert f"{bad}:5: 'label' must be true (desirable) or false" in str(info.value)
    assert f"{bad}:6: missing field(s) 'completion'" in str(info.value)
    one_sided = write_jsonl(tmp_path / "good_only.jsonl",
                            [r for r in greeting_kto_records(8, seed=3) if r["label"]])
    with pytest.raises(DataError, match=r"good_only.jsonl: all 4 examples are labelled true; KTO needs"):
        train(finetune_config(data["base"], one_sided, tmp_path / "r2", objective="kto"), quiet=True)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", greeting_preference_records(3, seed=3))  # a DPO file given to KTO
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field\(s\) 'completion', 'label'"):
        train(finetune_config(data["base"], pairs, tmp_path / "r3", objective="kto"), quiet=True)


def test_kto_notes_the_class_balance(data, tmp_path) -> None:
    from bastion.train.checkpoints import start_point

    cfg = _config(data, tmp_path / "run", "kto", preference={"kto_undesirable_weight": 0.5})
    task = task_class("kto")(cfg, start_point(cfg, fine_tunes=True))
    assert any("96 desirable, 96 undesirable; lambda_D*n_D / (lambda_U*n_U) = 2.00 (the KTO paper suggests 1 to 1.33"
               in note for note in task.describe())
