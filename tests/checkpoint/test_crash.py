"""Crash safety: SIGKILL a process at random moments while it saves checkpoints; the newest
committed checkpoint must always verify, load, and (for training) resume exactly."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import tiny_config

from bastion.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from bastion.train import train
from bastion.train.metrics import read_metrics

SAVER = """
import sys, torch
from bastion.checkpoint import Checkpoint, list_checkpoints, save_checkpoint
root = sys.argv[1]
done = list_checkpoints(root)
step = int(done[-1].name.split("_")[1]) + 1 if done else 1
print("ready", flush=True)
while True:
    value = float(step)
    model = {"w": torch.full((512, 1024), value), "b": torch.full((1024,), value)}  # ~2 MB per save
    save_checkpoint(root, step, Checkpoint(model=model, trainer_state={"step": step}, config_yaml="a: 1\\n",
                                           tokenizer_json="{}"), keep_last=2)
    step += 1
"""


def kill_at_random(cmd, rng, env, low=0.0, high=0.4):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(rng.uniform(low, high))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def assert_newest_is_intact(root):
    newest = resolve_checkpoint(root)
    loaded = load_checkpoint(newest)  # verifies every hash
    step = loaded.trainer_state["step"]
    assert newest.name == f"step_{step:08d}"
    assert torch.all(loaded.model["w"] == float(step)) and torch.all(loaded.model["b"] == float(step))
    assert all(not p.name.startswith(".tmp") for p in list_checkpoints(root))
    return step


@pytest.mark.parametrize("rounds", [pytest.param(6, id="6-kills"), pytest.param(40, id="40-kills", marks=pytest.mark.slow)])
def test_sigkill_during_saves_never_exposes_a_partial_checkpoint(tmp_path, rounds):
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    last_step = 0
    for _ in range(rounds):
        kill_at_random([sys.executable, "-c", SAVER, str(tmp_path)], rng, env)
        if list_checkpoints(tmp_path):
            step = assert_newest_is_intact(tmp_path)
            assert step >= last_step
            last_step = step
    assert last_step > 0, "the saver never committed a checkpoint; kills came too early to test anything"


def test_training_killed_mid_run_resumes_exactly(arithmetic_data, tmp_path):
    """SIGKILL `bastion train` (which checkpoints every step) twice, resume each time, and the
    finished run's loss curve equals an uninterrupted run's."""
    steps = 36  # the kills land after ~14 and ~23 logged steps (seed 7): 13 steps still to resume
    run = tmp_path / "run"
    cfg = tiny_config(arithmetic_data, run, max_steps=steps)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 1})})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(7)
    kill_after = 0
    for attempt in range(2):
        # Kill by progress, not by wall clock (a loaded CI machine is slow): once the run has
        # logged a random number of further steps, at whatever point of a step/save it is in.
        kill_after += rng.randint(5, 20)
        proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "train", "-c", str(cfg_path), "--quiet",
                                 *(["--resume"] if attempt else [])], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < kill_after:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        load_checkpoint(run / "checkpoints")  # the newest committed checkpoint always loads
    done = load_checkpoint(run / "checkpoints").trainer_state["step"]
    assert done < steps, "the run finished before it was killed; nothing was tested"
    train(cfg, quiet=True, resume=True)
    reference = train(tiny_config(arithmetic_data, tmp_path / "ref", max_steps=steps), quiet=True)
    resumed = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert resumed == reference.losses


PRUNER = """
import shutil, sys, time
from pathlib import Path
from bastion.checkpoint import prune

def delete_one_file_then_hang(path, *args, **kwargs):  # a prune caught in the middle of a delete
    sorted(Path(path).iterdir())[0].unlink()
    print("deleting", flush=True)
    time.sleep(600)

shutil.rmtree = delete_one_file_then_hang
prune(sys.argv[1], 1)
"""


def test_sigkill_mid_prune_never_leaves_a_half_deleted_checkpoint_in_view(tmp_path):
    from bastion.checkpoint import Checkpoint, prune, save_checkpoint, verify_checkpoint

    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, Checkpoint(model={"w": torch.full((8,), float(step))},
                                                   trainer_state={"step": step}, config_yaml="a: 1\n",
                                                   tokenizer_json="{}"))
    proc = subprocess.Popen([sys.executable, "-c", PRUNER, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().strip() == b"deleting"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    listed = list_checkpoints(tmp_path)
    assert [p.name for p in listed] == ["step_00000003"]  # the two being pruned are out of view
    for path in [*listed, resolve_checkpoint(tmp_path)]:
        verify_checkpoint(path)
    assert any(p.name.startswith(".trash-step_") for p in tmp_path.iterdir())
    prune(tmp_path, 1)  # the next prune removes what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]
