"""Fine-tuning and alignment through the one training loop: SFT teaches a new format, DPO
and SimPO move held-out preferences and generations, LoRA trains only adapters, runs resume
exactly. Everything starts from tiny models built here (nothing is downloaded)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import finetune_config, make_base_checkpoint

from bastion.checkpoint import load_checkpoint
from bastion.config import build_config
from bastion.config.schema import GenerateConfig
from synthetic.chat import (
    RUDE,
    greeting_preference_records,
    held_out_greeting_prompts,
    held_out_reverse_prompts,
    reverse_chat_records,
    write_jsonl,
)
from bastion.errors import BastionError, CheckpointError, ConfigError, DataError
from bastion.eval.finetune import eval_generate, eval_preferences
from bastion.rewards import parse_reward_spec
from bastion.infer.generate import generate_chat
from bastion.infer.loading import load_for_inference
from bastion.adapters import ADAPTER_CONFIG, merge_checkpoint
from bastion.model.lora import is_lora_name
from bastion.train.loop import train

REVERSE_FORMAT = r"<r>[a-j]( [a-j])*</r>"


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
    """A random base model, reverse SFT data, greeting SFT + preference data, and a base
    that was SFT'd on mostly rude greetings (the starting point of the alignment tests)."""
    root = tmp_path_factory.mktemp("ft")
    base = make_base_checkpoint(root / "base")
    write_jsonl(root / "reverse.jsonl", reverse_chat_records(2000, seed=1))
    held = held_out_reverse_prompts(40, seed=2)
    write_jsonl(root / "reverse_val.jsonl", [{"messages": m + [{"role": "assistant", "content": r}]} for m, r in held])
    write_jsonl(root / "reverse_prompts.jsonl", [{"messages": m, "answer": r} for m, r in held])

    pairs = greeting_preference_records(1000, seed=1)
    # SFT data that prefers rudeness 3:1, so alignment has something to move.
    write_jsonl(root / "greet_sft.jsonl",
                [{"messages": r["prompt"] + r["chosen" if i % 4 == 0 else "rejected"]} for i, r in enumerate(pairs)])
    write_jsonl(root / "pref.jsonl", pairs)
    rng = random.Random(0)
    greet_held = held_out_greeting_prompts(40, seed=5)
    val_pairs = []
    for msgs, polite in greet_held:
        name = msgs[0]["content"].removeprefix("greet ")
        rude = rng.choice(RUDE).format(name=name, upper=name.upper())
        val_pairs.append({"prompt": msgs, "chosen": [{"role": "assistant", "content": polite}],
                          "rejected": [{"role": "assistant", "content": rude}]})
    write_jsonl(root / "pref_val.jsonl", val_pairs)
    write_jsonl(root / "greet_prompts.jsonl", [{"messages": m} for m, _ in greet_held] * 3)
    sft = train(finetune_config(base, root / "greet_sft.jsonl", root / "greet_sft_run", max_steps=600), quiet=True)
    return {"root": root, "base": base, "rude_base": sft.checkpoint}


def _polite_rate(ckpt, ft) -> float:
    reward = parse_reward_spec(r"regex:Hello, \w+! Nice to meet you\.")
    return eval_generate(ckpt, ft["root"] / "greet_prompts.jsonl", [reward], roots=["/"], temperature=0.7,
                         seed=0).mean["regex"]


# ---- SFT -----------------------------------------------------------------------------------


def test_sft_teaches_a_new_format(ft, tmp_path):
    fmt = parse_reward_spec(f"regex:{REVERSE_FORMAT}")
    prompts = ft["root"] / "reverse_prompts.jsonl"
    before = eval_generate(ft["base"], prompts, [fmt], roots=["/"]).mean["regex"]
    cfg = finetune_config(ft["base"], ft["root"] / "reverse.jsonl", tmp_path / "run",
                          val_file=ft["root"] / "reverse_val.jsonl", max_steps=600, eval_every=300)
    result = train(cfg, quiet=True)
    after = eval_generate(result.checkpoint, prompts, [fmt], roots=["/"]).mean["regex"]
    assert before == 0.0 and after >= 0.9, (before, after)  # held-out words, greedy decoding
    assert result.val_metrics["loss"] < 1.2 and result.val_metrics["perplexity"] == pytest.approx(
        math.exp(result.val_metrics["loss"]))
    # The fine-tuned checkpoint keeps the tokenizer and records where it came from.
    state = load_checkpoint(result.checkpoint, load_optimizer=False).trainer_state
    assert state["objective"] == "sft" and state["init_from"]["path"] == str(ft["base"].resolve())


@pytest.mark.slow
def test_sft_learns_reversal_exactly(tmp_path):
    """The whole task, not only its format: exact answers on held-out words (~2-3 min)."""
    base = make_base_checkpoint(tmp_path / "base", d_model=96, n_layer=3)
    write_jsonl(tmp_path / "train.jsonl", reverse_chat_records(2000, seed=1))
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": m, "answer": r} for m, r in held_out_reverse_prompts(40, seed=2)])
    result = train(finetune_config(base, tmp_path / "train.jsonl", tmp_path / "run", max_steps=3000, lr=1e-3), quiet=True)
    exact = parse_reward_spec("exact")
    assert eval_generate(result.checkpoint, tmp_path / "prompts.jsonl", [exact], roots=["/"]).mean["exact"] >= 0.8


def test_eval_generate_batches_prompts_without_changing_any_completion(ft, tmp_path):
    """Prompts decode together through the engine (batch-invariant mode): every completion,
    greedy or sampled, is the same at batch size 1 and 8; greedy matches generate() run
    prompt by prompt; a prompt over the limits is refused by number before any generation."""
    from bastion.errors import GenerationLimitError
    from bastion.infer.generate import generate
    from bastion.infer.loading import load_for_inference

    prompts = ft["root"] / "greet_prompts.jsonl"
    reward = parse_reward_spec("length:1-1000")
    for temperature in (0.0, 0.9):
        one, eight = (eval_generate(ft["rude_base"], prompts, [reward], roots=["/"], temperature=temperature, seed=3,
                                    keep_samples=1000, batch_size=b) for b in (1, 8))
        assert [x["completion"] for x in one.samples] == [x["completion"] for x in eight.samples]
        assert one.n == 120 and len(one.samples) == 120
    loaded = load_for_inference(ft["rude_base"])
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    sequential = [generate(loaded.model, loaded.tokenizer, loaded.chat.encode_prompt(r["messages"]),
                           limits=loaded.config.generate, temperature=0.0, stop_ids=loaded.chat.stop_ids).text
                  for r in records[:20]]
    greedy = eval_generate(ft["rude_base"], prompts, [reward], roots=["/"], keep_samples=20, max_prompts=20)
    agree = sum(a == b["completion"] for a, b in zip(sequential, greedy.samples))
    assert agree >= 19, agree  # (bit-level differences in batched matmuls may flip a rare near-tie)

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "hello " * 5000}) + "\n")
    with pytest.raises(GenerationLimitError, match="prompt 2"):
        eval_generate(ft["rude_base"], long, [reward], roots=["/"])


def test_sft_loss_counts_only_assistant_tokens(ft, tmp_path):
    cfg = finetune_config(ft["base"], ft["root"] / "reverse.jsonl", tmp_path / "run", max_steps=2, log_every=1)
    result = train(cfg, quiet=True)
    every = finetune_config(ft["base"], ft["root"] / "reverse.jsonl", tmp_path / "run_all", max_steps=2, log_every=1)
    every = every.model_copy(update={"finetune": every.finetune.model_copy(update={"assistant_only_loss": False})})
    # Predicting the (random) template and prompt tokens too gives a different loss.
    assert result.losses[0] != pytest.approx(train(every, quiet=True).losses[0])


# ---- preference alignment ------------------------------------------------------------------


def test_dpo_raises_preference_accuracy_and_moves_generations(ft, tmp_path):
    cfg = finetune_config(ft["rude_base"], ft["root"] / "pref.jsonl", tmp_path / "dpo", objective="dpo",
                          val_file=ft["root"] / "pref_val.jsonl", max_steps=50, lr=3e-4, batch_size=8,
                          eval_every=25, eval_batches=10, log_every=1, preference={"beta": 0.1})
    result = train(cfg, quiet=True)
    # Step 1: the policy is the reference, every reward is 0, the loss is log 2.
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert result.val_metrics["reward_accuracy"] >= 0.9 and result.val_metrics["reward_margin"] > 0.5
    # The same numbers from the eval command, with the SFT model as the reference.
    again = eval_preferences(result.checkpoint, ft["root"] / "pref_val.jsonl", reference=ft["rude_base"], roots=["/"])
    assert again["pairs"] == result.val_metrics["pairs"], (again["pairs"], result.val_metrics["pairs"])
    assert again["reward_accuracy"] == pytest.approx(result.val_metrics["reward_accuracy"])
    assert again["reward_margin"] == pytest.approx(result.val_metrics["reward_margin"], rel=1e-3)
    before, after = _polite_rate(ft["rude_base"], ft), _polite_rate(result.checkpoint, ft)
    assert after >= before + 0.3, (before, after)
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if m["kind"] == "train"]
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(train_rows[-1])


def test_simpo_is_reference_free_and_learns(ft, tmp_path):
    cfg = finetune_config(ft["rude_base"], ft["root"] / "pref.jsonl", tmp_path / "simpo", objective="simpo",
                          val_file=ft["root"] / "pref_val.jsonl", max_steps=50, lr=3e-4, batch_size=8,
                          eval_every=50, eval_batches=10, preference={"beta": 2.0, "simpo_gamma": 0.5})
    result = train(cfg, quiet=True)
    assert result.val_metrics["reward_accuracy"] >= 0.9
    without_reference = eval_preferences(result.checkpoint, ft["root"] / "pref_val.jsonl", roots=["/"])
    assert without_reference["reward_accuracy"] == pytest.approx(result.val_metrics["reward_accuracy"])


# ---- LoRA ----------------------------------------------------------------------------------


def test_lora_dpo_trains_only_adapters_and_merges(ft, tmp_path):
    lora = {"rank": 4, "alpha": 8, "target_modules": ["wq", "wv", "w2"]}
    cfg = finetune_config(ft["rude_base"], ft["root"] / "pref.jsonl", tmp_path / "lora", objective="dpo",
                          val_file=ft["root"] / "pref_val.jsonl", max_steps=40, lr=3e-3, batch_size=8,
                          eval_every=40, lora=lora)
    result = train(cfg, quiet=True)
    assert result.val_metrics["reward_accuracy"] >= 0.9
    saved = load_checkpoint(result.checkpoint, load_optimizer=False)
    assert saved.model and all(is_lora_name(k) for k in saved.model)  # adapters only: small checkpoints
    assert (result.adapter / ADAPTER_CONFIG).is_file()

    # Merged (from the adapter folder or from the run) equals base + adapter at load time.
    merged_a = merge_checkpoint(ft["rude_base"], result.adapter, tmp_path / "merged_a")
    merged_b = merge_checkpoint(ft["rude_base"], tmp_path / "lora", tmp_path / "merged_b")
    x = torch.randint(0, 300, (2, 24))
    logits = [load_for_inference(p).model(x)[0] for p in (result.checkpoint, merged_a, merged_b)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], logits[2], atol=0, rtol=0)
    base_logits = load_for_inference(ft["rude_base"]).model(x)[0]
    assert (logits[0] - base_logits).abs().max() > 1e-3  # the adapters do change the model

    # Only the adapted projections moved; every other tensor is the base's, bit for bit.
    base_state = load_checkpoint(ft["rude_base"], load_optimizer=False).model
    merged_state = load_checkpoint(merged_a, load_optimizer=False).model
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed and all(k.endswith(("attention.wq.weight", "attention.wv.weight", "feed_forward.w2.weight"))
                           for k in changed)


def test_lora_gradients_reach_only_adapters(ft):
    from bastion.config.schema import LoraConfig
    from bastion.model import Transformer
    from bastion.model.lora import apply_lora

    loaded = load_for_inference(ft["base"])
    model: Transformer = loaded.model.train()
    apply_lora(model, LoraConfig(enabled=True, rank=4, target_modules=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
    x = torch.randint(0, 300, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(is_lora_name(n) for n in with_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not is_lora_name(n))
    # lora_B starts at zero, so only it gets a gradient on the first step... and lora_A none
    # (B = 0 blocks it): exactly PEFT's behaviour.
    assert all(n.endswith("lora_B") for n in with_grad if model.get_parameter(n).grad.abs().sum() > 0)


# ---- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("objective,lora", [("sft", None), ("dpo", {"rank": 4})])
def test_finetune_resume_is_exact(ft, tmp_path, objective, lora):
    data = ft["root"] / ("reverse.jsonl" if objective == "sft" else "pref.jsonl")
    start = ft["base"] if objective == "sft" else ft["rude_base"]

    def cfg(out):
        return finetune_config(start, data, out, objective=objective, max_steps=12, lr=1e-3, batch_size=4,
                               log_every=1, lora=lora)

    straight = train(cfg(tmp_path / "a"), quiet=True)
    first = train(cfg(tmp_path / "b"), quiet=True, should_stop=lambda step: step == 5)
    assert first.steps == 5 and first.stopped_by == "callback"
    second = train(cfg(tmp_path / "b"), resume=True, quiet=True)
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)


# ---- bad input ------------------------------------------------------------------------------


def test_finetune_config_errors(tmp_path):
    with pytest.raises(BastionError, match="finetune.init_from"):
        build_config({"train": {"objective": "sft"}})
    with pytest.raises(BastionError, match="finetune.train_file"):
        build_config({"train": {"objective": "dpo"}, "finetune": {"init_from": "x"}})
    with pytest.raises(BastionError, match="lora.enabled needs train.objective"):
        build_config({"finetune": {"lora": {"enabled": True}}})
    with pytest.raises(BastionError, match="clm only"):
        build_config({"train": {"objective": "sft", "dp": {"enabled": True}},
                      "finetune": {"init_from": "x", "train_file": "y"}})
    with pytest.raises(BastionError, match="unknown LoRA target"):
        build_config({"finetune": {"lora": {"target_modules": ["q_proj"]}}})


def test_finetune_refuses_bad_starts_and_files(ft, tmp_path):
    data = ft["root"] / "reverse.jsonl"
    with pytest.raises(CheckpointError, match="finetune.init_from: checkpoint not found"):
        train(finetune_config(tmp_path / "missing", data, tmp_path / "r1"), quiet=True)
    # Data outside data.allowed_roots is refused by name.
    with pytest.raises(DataError, match="finetune.train_file"):
        train(finetune_config(ft["base"], data, tmp_path / "r2", roots=[str(tmp_path)]), quiet=True)
    # Examples longer than the rows: a clear message naming both settings.
    with pytest.raises(DataError, match="train.seq_len"):
        cfg = finetune_config(ft["base"], data, tmp_path / "r3", seq_len=16)
        train(cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_length": 64})}), quiet=True)
    # seq_len beyond the starting model's context.
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(finetune_config(ft["base"], data, tmp_path / "r4", seq_len=256), quiet=True)
    # A malformed record: file:line and what is wrong, nothing trained.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*1.*last message is user"):
        train(finetune_config(ft["base"], bad, tmp_path / "r5"), quiet=True)
    assert not (tmp_path / "r5").exists()


def test_lora_checkpoint_is_not_a_start_point_and_resume_checks_base(ft, tmp_path):
    data = ft["root"] / "pref.jsonl"
    run = train(finetune_config(ft["rude_base"], data, tmp_path / "lora", objective="dpo", max_steps=2,
                                batch_size=4, lora={"rank": 2}), quiet=True)
    with pytest.raises(CheckpointError, match="bastion merge"):
        train(finetune_config(run.checkpoint, data, tmp_path / "again", objective="dpo"), quiet=True)
    with pytest.raises(CheckpointError, match="different checkpoint"):
        train(finetune_config(ft["base"], data, tmp_path / "lora", objective="dpo", max_steps=4, batch_size=4,
                              lora={"rank": 2}), resume=True, quiet=True)
    with pytest.raises(CheckpointError, match="objective"):
        train(finetune_config(ft["rude_base"], ft["root"] / "greet_sft.jsonl", tmp_path / "lora", objective="sft",
                              max_steps=4, batch_size=4, lora={"rank": 2}), resume=True, quiet=True)


def test_generate_chat_uses_template_and_stops_at_end_of_turn(ft):
    loaded = load_for_inference(ft["rude_base"])
    result = generate_chat(loaded.model, loaded.chat, [{"role": "user", "content": "greet kalomi"}],
                           limits=GenerateConfig(temperature=0.0, max_new_tokens=40))
    assert result.finish_reason == "eos" and len(result.token_ids) < 40 and "<|im_start|>" not in result.text
