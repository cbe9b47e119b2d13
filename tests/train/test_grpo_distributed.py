"""GRPO under torchrun (2 CPU processes, gloo, DDP): each rank samples the groups of its own
prompts, and the run follows one process with the same global batch - the same completions
(rollout_mode rowwise: bit-identical whatever the batch), rewards and losses."""
import json
import subprocess
import sys

import pytest
import yaml

from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.train import train
from helpers import finetune_config, make_base_checkpoint
from synthetic.chat import write_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-dist")
    words = ["abc", "def", "ghi", "jab", "cab", "bad", "fig", "hid"]
    return {"base": make_base_checkpoint(root / "base"),
            "train": write_jsonl(root / "prompts.jsonl", [{"prompt": f"reverse: {w}"} for w in words * 2]),
            "val": write_jsonl(root / "val.jsonl", [{"prompt": f"reverse: {w}"} for w in words[:3]])}


def config(data, out, batch_size, **train_settings):
    cfg = finetune_config(data["base"], data["train"], out, objective="grpo", val_file=data["val"],
                          batch_size=batch_size, max_steps=STEPS, lr=1e-2, warmup_steps=0, log_every=1,
                          eval_every=STEPS, eval_batches=10, threads=1, **train_settings).model_dump(mode="json")
    cfg["grpo"] = {"group_size": 4, "max_new_tokens": 6, "rollout_mode": "rowwise"}
    cfg["rewards"] = [{"name": "regex", "pattern": "a", "mode": "search"}]  # built in: the ranks load it too
    return build_config(cfg)


def metrics(run_dir):
    return {(r["kind"], r["step"]): r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_two_ranks_follow_one_process(data, tmp_path):
    one = train(config(data, tmp_path / "one", batch_size=4), quiet=True)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config(data, tmp_path / "two", batch_size=2).model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "bastion.cli", "train", "-c", str(path), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = metrics(one.run_dir), metrics(tmp_path / "two")
    assert set(single) == set(double) and ("val", STEPS) in single
    for key, row in single.items():
        other = double[key]
        # the same completions, so the same rewards, exactly; the loss within float summation order
        for name in ("reward", "reward_std", "solved", "completion_tokens", "pass@1"):
            if name in row:
                assert other[name] == pytest.approx(row[name], abs=1e-6), (key, name)
        assert other["loss"] == pytest.approx(row["loss"], abs=1e-5), key


def test_fsdp_is_refused_with_a_reason(data, tmp_path, monkeypatch):
    from bastion.train.tasks.grpo import GRPOTask
    from bastion.train.checkpoints import start_point

    cfg = config(data, tmp_path / "x", batch_size=2, parallel="fsdp")
    with pytest.raises(ConfigError, match="train.parallel: ddp"):
        GRPOTask(cfg, start_point(cfg, fine_tunes=True), rank=0, world=2)
