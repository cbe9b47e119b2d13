"""The fine-tuning path through the `bastion` command: train (LoRA SFT) -> merge -> export
(HF, PEFT) -> eval loss / preferences / generate -> generate --chat."""
import json

import yaml
from helpers import make_base_checkpoint
from typer.testing import CliRunner

from bastion.cli import app
from synthetic.chat import greeting_preference_records, reverse_chat_records, write_jsonl

runner = CliRunner()


def test_finetune_workflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data files must lie under the allowed roots (default ".")
    base = make_base_checkpoint(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", reverse_chat_records(200, seed=1))
    write_jsonl(tmp_path / "pref.jsonl", greeting_preference_records(20, seed=1))
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "reverse: a b c"}],
                                               "answer": "<r>c b a</r>"}])
    config = {
        "train": {"objective": "sft", "out_dir": "run", "seq_len": 128, "batch_size": 8, "max_steps": 6,
                  "warmup_steps": 1, "lr": 3e-3, "threads": 2, "device": "cpu"},
        "finetune": {"init_from": str(base), "train_file": "train.jsonl", "max_length": 128,
                     "lora": {"enabled": True, "rank": 4, "alpha": 8}},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["train", "--config", "sft.yaml", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "adapter run/adapter" in result.output

    result = runner.invoke(app, ["merge", str(base), "run/adapter", "merged"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "peft", "run/adapter", "peft_out", "--base-model", "hf_out"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "peft_out").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    # A LoRA checkpoint is not a full model: export says what to do instead.
    result = runner.invoke(app, ["export", "hf", "run", "hf_lora"])
    assert result.exit_code == 2 and "bastion merge" in result.output

    result = runner.invoke(app, ["eval", "loss", "--checkpoint", "run", "--file", "train.jsonl", "--json", "loss.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "loss.json").read_text())["examples"] == 200
    result = runner.invoke(app, ["eval", "preferences", "--checkpoint", "merged", "--file", "pref.jsonl",
                                 "--reference", str(base)])
    assert result.exit_code == 0 and "reward_accuracy" in result.output, result.output
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", "run", "--file", "prompts.jsonl",
                                 "--reward", "exact", "--reward", "regex:<r>.*</r>", "--max-new-tokens", "12",
                                 "--batch-size", "4", "--threads", "1", "--json", "gen.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "gen.json").read_text())
    assert report["prompts"] == 1 and set(report["mean"]) == {"exact", "regex", "reward"}  # each by name, then their sum

    result = runner.invoke(app, ["generate", "--checkpoint", "merged", "--chat", "-p", "reverse: a b",
                                 "--max-new-tokens", "8", "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["completion_tokens"] <= 8


def test_eval_cli_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = make_base_checkpoint(tmp_path / "base")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"messages": [{"role": "assistant", "content": "y"}]}\n')
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", str(base), "--file", "p.jsonl", "--reward", "bleu"])
    assert result.exit_code == 2 and "unknown reward 'bleu'" in result.output
    result = runner.invoke(app, ["eval", "generate", "--checkpoint", str(base), "--file", "p.jsonl", "--reward", "exact"])
    assert result.exit_code == 2 and "p.jsonl:2" in result.output
    result = runner.invoke(app, ["eval", "loss", "--checkpoint", str(base), "--file", "/etc/passwd"])
    assert result.exit_code == 2 and "--file" in result.output
