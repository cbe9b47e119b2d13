"""`bastion demo --rl` (bastion/demo_rl.py): the held-out rule keeps every test problem out
of every training file, and the whole pipeline (data -> pretrain -> SFT -> GRPO -> plot) runs
at a toy size. The learning effect at full size is measured in docs/alignment.md, not
asserted here: a toy run is too small to learn addition."""
import json
import random

import pytest

from bastion.demo_rl import RLDemoSize, answer, is_held_out, question, run_rl_demo, sample_problems, write_demo_data
from bastion.errors import BastionError

# SFT in rounds of 2 steps up to 5 (a target no toy model reaches): 2, 4 (resumed), 5 (resumed).
TOY = RLDemoSize(pretrain_steps=4, sft_steps=5, sft_round=2, sft_target=1.01, grpo_steps=2, n_sft=300, n_prompts=16,
                 n_held_out=8, n_dev=8, d_model=32, n_layer=1, batch_size=4, grpo_batch=4, group_size=2, eval_points=1)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_held_out_rule_and_the_answer_format():
    held = [(a, b) for a in range(100) for b in range(100) if is_held_out(a, b)]
    assert len(held) == 1017  # about one problem in ten
    # A hash, not a pattern of digits: held-out sums show every pair of units digits and
    # carries as often as training sums do.
    assert len({(a % 10, b % 10) for a, b in held}) == 100
    assert 0.35 < sum(a % 10 + b % 10 >= 10 for a, b in held) / len(held) < 0.55
    assert question(47, 78) == "4 7 + 7 8 =" and answer(47, 78) == "5 2 1"  # 125, last digit first
    assert question(3, 4) == "0 3 + 0 4 =" and answer(3, 4) == "7 0 0"  # fixed width
    rng = random.Random(0)
    assert all(is_held_out(a, b) for a, b in sample_problems(50, 2, rng, held_out=True))
    assert not any(is_held_out(a, b) for a, b in sample_problems(50, 2, rng, held_out=False))
    with pytest.raises(BastionError, match="only 1017 held-out problems"):
        sample_problems(1018, 2, rng, held_out=True)


def test_no_held_out_problem_is_in_any_training_file(tmp_path):
    files = write_demo_data(tmp_path / "a", TOY)
    held_out = {r["prompt"] for r in read(files.val_prompts)}
    assert len(held_out) == TOY.n_held_out
    assert {r["messages"][0]["content"] for r in read(files.held_out)} == held_out
    sft = {r["messages"][0]["content"] for r in read(files.sft)}
    text = {line.rsplit("=", 1)[0] + "=" for doc in read(files.corpus) for line in doc["text"].splitlines()}
    prompts = {r["prompt"] for r in read(files.prompts)}
    assert sft == text and len(sft) == TOY.n_sft and len(prompts) == TOY.n_prompts
    assert not sft & prompts  # GRPO's prompts were never seen with an answer
    dev = {r["messages"][0]["content"] for r in read(files.dev)}
    assert len(dev) == TOY.n_dev and not dev & (sft | prompts)  # when SFT stops: no training sum
    assert not (sft | prompts | dev) & held_out
    operands = {question(a, b): (a, b) for a in range(100) for b in range(100)}
    assert all(r["messages"][1]["content"] == answer(*operands[r["messages"][0]["content"]]) for r in read(files.sft))
    assert all(r["answer"] == answer(*operands[r["prompt"]]) for r in read(files.prompts) + read(files.val_prompts))
    again = write_demo_data(tmp_path / "b", TOY)  # seeded: the same files every run
    assert all(getattr(files, f).read_bytes() == getattr(again, f).read_bytes() for f in files.__dataclass_fields__)


def test_the_pipeline_runs_and_plots_reward_and_accuracy(tmp_path):
    result = run_rl_demo(tmp_path / "demo-rl", TOY, quiet=True)
    assert [s.name for s in result.stages] == ["data", "pretrain", "sft", "grpo"]
    assert [s.steps for s in result.stages[1:]] == [4, 5, 2]
    sft_steps = [m["step"] for m in read(result.plot.parent.parent / "sft" / "metrics.jsonl") if m["kind"] == "train"]
    assert sft_steps == sorted(set(sft_steps)) and sft_steps[-1] == 5  # one run, resumed, no step twice
    assert 0.0 <= result.sft_accuracy <= 1.0 and 0.0 <= result.grpo_accuracy <= 1.0
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read(result.plot.parent / "metrics.jsonl")
    assert {"reward", "solved", "clip_fraction"} <= set(next(m for m in metrics if m["kind"] == "train"))
    assert {"reward", "pass@1"} <= set(next(m for m in metrics if m["kind"] == "val"))
    with pytest.raises(BastionError, match="not a demo folder"):  # --out is replaced only if it is a demo's
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        run_rl_demo(tmp_path / "other", TOY, quiet=True)
