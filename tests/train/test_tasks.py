"""The objective registry: a new objective is a task + its loss registered beside the others.

The toy objective below is defined and registered here, in the test, and runs through the
real loop (checkpoint, resume, validation, the CLI's config check) without any change to
bastion/train/loop.py or the config schema."""
import pytest
import torch.nn.functional as F
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint
from bastion.cli import app
from bastion.data.batches import batch_to_device
from bastion.data.finetune import IGNORE_INDEX
from bastion.errors import ConfigError
from bastion.train import train
from bastion.train.metrics import read_metrics
from bastion.train.tasks import TASKS, register_task, task_class
from bastion.train.tasks.sft import SFTTask
from helpers import finetune_config, make_base_checkpoint
from synthetic.chat import reverse_chat_records, write_jsonl


class SmoothedSFT(SFTTask):
    """Toy objective: SFT with label smoothing (0.1) on the assistant tokens."""

    objective = "toy_smoothed_sft"

    def micro_batch_loss(self, forward, device):
        full, mine, _ = self._next_rows()
        batch = batch_to_device(mine, device)
        logits, _ = forward(batch["input_ids"], segment_ids=batch["segment_ids"] if self.train.pack else None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=0.1)
        return loss, int(full["num_tokens"]), {"counted": (batch["labels"] != IGNORE_INDEX).sum().float()}


@pytest.fixture
def toy_objective(monkeypatch):
    monkeypatch.setitem(TASKS, SmoothedSFT.objective, SmoothedSFT)  # registered for this test only
    return SmoothedSFT.objective


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {"base": make_base_checkpoint(root / "base"),
            "train": write_jsonl(root / "train.jsonl", reverse_chat_records(200, seed=0)),
            "val": write_jsonl(root / "val.jsonl", reverse_chat_records(24, seed=1))}


def test_a_test_registered_objective_trains_checkpoints_and_resumes(toy_objective, chat_data, tmp_path):
    cfg = finetune_config(chat_data["base"], chat_data["train"], tmp_path / "run", objective=toy_objective,
                          val_file=chat_data["val"], max_steps=30, eval_every=30, log_every=5)
    first = train(cfg, quiet=True, should_stop=lambda step: step == 20)  # stopped as a signal would
    assert first.steps == 20 and first.stopped_by == "callback" and first.losses[-1] < first.losses[0]
    state = load_checkpoint(first.checkpoint, load_optimizer=False).trainer_state
    assert state["objective"] == toy_objective and state["step"] == 20

    resumed = train(cfg, resume=True, quiet=True)
    straight = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": str(tmp_path / "b")})}),
                     quiet=True)
    assert resumed.steps == straight.steps == 30
    assert resumed.losses == pytest.approx(straight.losses[20:], rel=1e-5)  # exact resume of the toy task too
    assert resumed.val_metrics["loss"] == pytest.approx(straight.val_metrics["loss"], rel=1e-5)
    logged = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert logged and all(r["counted"] > 0 for r in logged)  # the task's own statistics reach the log


def test_unknown_objectives_are_refused_with_the_registered_names(toy_objective, chat_data, tmp_path):
    cfg = finetune_config(chat_data["base"], chat_data["train"], tmp_path / "run", objective="no_such_objective")
    with pytest.raises(ConfigError, match=r"train.objective: not a registered objective; choose one of .*clm.*dpo"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert task_class(toy_objective) is SmoothedSFT

    path = tmp_path / "cfg.yaml"
    path.write_text(f"train: {{objective: {toy_objective}}}\nfinetune: {{init_from: x, train_file: y}}\n")
    runner = CliRunner()
    assert runner.invoke(app, ["config", "validate", str(path)]).exit_code == 0
    path.write_text("train: {objective: sftt}\nfinetune: {init_from: x, train_file: y}\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 2 and "train.objective" in result.output and "sftt" not in result.output


def test_registry_refuses_bad_and_duplicate_names(monkeypatch):
    monkeypatch.setattr("bastion.train.tasks.base.TASKS", dict(TASKS))

    class Clash(SFTTask):
        objective = "sft"

    class BadName(SFTTask):
        objective = "Not A Name"

    with pytest.raises(ValueError, match="already registered"):
        register_task(Clash)
    with pytest.raises(ValueError, match="objective must be"):
        register_task(BadName)
    assert {"clm", "dpo", "sft", "simpo", "grpo", "reward", "orpo", "kto"} <= set(TASKS)  # the shipped objectives, unchanged
    assert "Not A Name" not in TASKS and TASKS["sft"] is not Clash


def test_builtin_objectives_describe_their_batches():
    assert task_class("clm").fine_tunes is False and task_class("clm").supports_dp
    assert all(task_class(name).fine_tunes and not task_class(name).supports_dp
               for name in ("sft", "dpo", "simpo", "orpo", "kto"))
