"""Data-parallel training under torchrun: 2 CPU processes (gloo) on loopback give the loss
curve of one process with the same global batch, and a checkpoint written by 2 ranks
resumes on 1 (and on 2) with the same curve."""
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import tiny_config

from bastion.checkpoint import load_checkpoint
from bastion.train import train


def config(data_dir, out_dir, batch_size, **train_settings):
    cfg = tiny_config(data_dir, out_dir, batch_size=batch_size, **{"max_steps": 12, "eval_every": 1000, "log_every": 1,
                                                                     **train_settings})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dropout": 0.0}),  # same math on every side
                                 "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 6, "keep_last": 3})})
    return cfg


def torchrun(cfg, tmp_path, nproc, *extra):
    path = tmp_path / f"cfg-{nproc}-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bastion.cli", "train", "-c", str(path), "--quiet", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def rank_process(launcher, rank):
    """The process of `rank` under a torchrun launcher, or None (not started yet)."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:  # exiting, or not yet exec'd
            pass
    return None


def kill_tree(launcher):
    """SIGKILL a torchrun launcher and its ranks: killed alone, the launcher leaves its ranks
    training on as orphans (max_steps 100_000 below) that slow every later test."""
    import psutil

    try:
        ranks = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.Error:
        ranks = []
    for rank in ranks:
        try:
            rank.kill()
        except psutil.Error:
            pass
    launcher.kill()
    launcher.wait()


@pytest.fixture(scope="module")
def single(arithmetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(config(arithmetic_data, out, batch_size=8), quiet=True)
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume_on_one_or_two(arithmetic_data, single, tmp_path, parallel):
    out = tmp_path / parallel
    # FSDP also recomputes activations in backward: the curve must not change.
    torchrun(config(arithmetic_data, out, batch_size=4, parallel=parallel,
                    activation_checkpointing=parallel == "fsdp"), tmp_path, 2)
    one, two = losses(single), losses(out)
    assert sorted(two) == list(range(1, 13))
    assert [two[s] for s in range(1, 13)] == pytest.approx([one[s] for s in range(1, 13)], abs=1e-5)
    assert (out / "checkpoints" / "step_00000012").is_dir()  # rank 0 wrote it, once
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_tflops"] > 0 for r in rows if r["kind"] == "train")  # MFU too, on known GPUs
    state = load_checkpoint(out / "checkpoints", load_optimizer=False).trainer_state
    assert state["tokens_seen"] == 12 * 8 * 64

    # Saved by 2 ranks at step 6, resumed by 1 process with the same global batch (8).
    for nproc, batch in ((1, 8), (2, 4)):
        resumed = tmp_path / f"resume-{nproc}"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000012")
        (resumed / "checkpoints" / "latest").write_text("step_00000006")
        cfg = config(arithmetic_data, resumed, batch_size=batch, parallel=parallel)
        if nproc == 1:
            train(cfg, resume=True, quiet=True)
        else:
            torchrun(cfg, tmp_path, 2, "--resume")
        again = losses(resumed)
        assert [again[s] for s in range(7, 13)] == pytest.approx([one[s] for s in range(7, 13)], abs=2e-4), nproc


def test_two_nodes_rendezvous_over_tcp(arithmetic_data, single, tmp_path):
    """Multi-node launch as the README shows it: two torchrun launchers ("nodes") of one
    process each meet at a c10d rendezvous endpoint on loopback; same curve as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(arithmetic_data, tmp_path / "nodes", batch_size=4, max_steps=6)
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bastion-test",
                                   "-m", "bastion.cli", "train", "-c", str(path), "--quiet"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in launchers] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    one, two = losses(single), losses(tmp_path / "nodes")
    assert [two[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compiled_two_ranks_match_one_eager_process(arithmetic_data, single, tmp_path, parallel):
    """train.compile under torchrun: the DDP-wrapped or FSDP2-sharded model compiles and
    follows the eager single-process curve (~20-40 s of compiling per run on 2 cores)."""
    out = tmp_path / f"compiled-{parallel}"
    torchrun(config(arithmetic_data, out, batch_size=4, parallel=parallel, compile=True, max_steps=6), tmp_path, 2)
    one, two = losses(single), losses(out)
    assert [two[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], abs=1e-4)


def test_fsdp_bf16_mixed_precision_trains(arithmetic_data, single, tmp_path):
    """bf16 compute with float32 master weights and reductions: close to the float32 curve."""
    out = tmp_path / "bf16"
    torchrun(config(arithmetic_data, out, batch_size=4, parallel="fsdp", dtype="bfloat16", max_steps=6), tmp_path, 2)
    one, half = losses(single), losses(out)
    assert [half[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], abs=0.05)
    assert half[6] < half[1]


def test_distributed_refuses_what_it_does_not_support_yet(arithmetic_data, tmp_path):
    cfg = config(arithmetic_data, tmp_path / "dp", batch_size=4)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"dp": cfg.train.dp.model_copy(
        update={"enabled": True})})})
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "bastion.cli", "train", "-c", str(path), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "single process" in proc.stderr


def test_rank_killed_mid_save_leaves_committed_checkpoints_loadable(arithmetic_data, tmp_path):
    """SIGKILL the writing rank (0) as soon as a checkpoint's temp folder appears: every
    committed checkpoint still verifies, and the run resumes from the newest one."""
    import os
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    from bastion.checkpoint import list_checkpoints

    out = tmp_path / "killed"
    cfg = config(arithmetic_data, out, batch_size=4)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 100_000}),
                                 "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 3})})
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "bastion.cli", "train", "-c", str(path), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        root = out / "checkpoints"
        deadline = time.time() + 120
        victim = None
        while victim is None and time.time() < deadline:
            committed = list_checkpoints(root) if root.exists() else []
            saving = root.exists() and any(p.name.startswith(".") and "tmp" in p.name for p in root.iterdir())
            if committed and saving:
                for child in psutil.Process(launcher.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "0":
                            victim = child
                    except psutil.Error:
                        pass
                if victim is not None:
                    os.kill(victim.pid, signal.SIGKILL)
            time.sleep(0.002)
        assert victim is not None, "no save was caught in progress"
        launcher.wait(60)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    committed = list_checkpoints(out / "checkpoints")
    assert committed
    for ckpt in committed:
        load_checkpoint(ckpt, verify=True)  # every committed checkpoint is whole
    newest = load_checkpoint(out / "checkpoints", verify=True)
    step = newest.trainer_state["step"]
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": step + 2, "batch_size": 8})})
    result = train(resumed, resume=True, quiet=True)
    assert result.steps == step + 2


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(arithmetic_data, tmp_path):
    """A preemption notice reaching one process (rank 1 here): the ranks agree on the stop
    at the next step, rank 0 writes the checkpoint of that step, all exit 0 - and the run
    resumes from it."""
    import signal
    import time

    pytest.importorskip("psutil")
    from bastion.checkpoint import list_checkpoints
    from bastion.train.metrics import read_metrics

    out = tmp_path / "preempted"
    cfg = config(arithmetic_data, out, batch_size=4)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 100_000})})
    path = tmp_path / "preempted.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "torchrun.log"  # a file, not a pipe nobody reads while we wait: it never fills
    with log.open("w") as stderr:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node=2", "-m", "bastion.cli", "train", "-c", str(path), "--quiet"],
                                    stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # Signal only once training is under way, however long a loaded machine takes to get
        # there (a signal sent at a fixed deadline instead tests whatever phase it lands in).
        deadline = time.time() + 900
        while sum(r["kind"] == "train" for r in read_metrics(out / "metrics.jsonl")) < 3:
            assert launcher.poll() is None, "the run ended before step 3:\n" + log.read_text()[-2000:]
            assert time.time() < deadline, "no 3 steps in 15 minutes:\n" + log.read_text()[-2000:]
            time.sleep(0.05)
        rank1 = rank_process(launcher, 1)
        assert rank1 is not None, "rank 1 not found"
        rank1.send_signal(signal.SIGTERM)
        launcher.wait(timeout=900)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    assert launcher.returncode == 0, log.read_text()[-2000:]
    last_step = max(losses(out))
    assert last_step < 100_000
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step_{last_step:08d}"  # the step every rank stopped at, saved
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": last_step + 2,
                                                                             "batch_size": 8})})
    assert train(resumed, resume=True, quiet=True).steps == last_step + 2
