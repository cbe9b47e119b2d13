"""The `bastion` command end to end, through typer's runner and a real subprocess."""
import json
import os
import subprocess
import sys

import yaml
from typer.testing import CliRunner

from bastion.cli import app
from synthetic.corpus import arithmetic_documents, write_corpus

runner = CliRunner()


def write_config(path, **sections):
    path.write_text(yaml.safe_dump(sections))
    return path


def test_help_for_every_command():
    for args in ([], ["config"], ["data"], ["data", "prepare"], ["train"], ["generate"], ["plot"], ["demo"],
                 ["config", "validate"], ["config", "show"], ["merge"], ["import", "hf"], ["export", "hf"],
                 ["export", "gguf"], ["export", "peft"], ["eval", "loss"], ["eval", "preferences"],
                 ["eval", "generate"], ["quantize"], ["publish"]):
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")):
        result = runner.invoke(app, ["config", "validate", str(path)])
        assert result.exit_code == 0, (path, result.output)


def test_config_validate_lists_every_problem(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", train={"batch_size": 0, "lr": -1, "typo": 1})
    result = runner.invoke(app, ["config", "validate", str(cfg)])
    assert result.exit_code == 2
    for field in ("train.batch_size", "train.lr", "train.typo"):
        assert field in result.output
    ok = write_config(tmp_path / "ok.yaml", train={"batch_size": 4})
    assert runner.invoke(app, ["config", "validate", str(ok)]).exit_code == 0
    bad_override = runner.invoke(app, ["config", "validate", str(ok), "--set", "train.batch_size=5000"])
    assert bad_override.exit_code == 2 and "train.batch_size" in bad_override.output


def test_config_show_redacts_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abcd-super-secret-9876")
    cfg = write_config(tmp_path / "c.yaml", train={"run_name": "${WANDB_API_KEY}"})
    result = runner.invoke(app, ["config", "show", str(cfg), "--set", "train.lr=0.01"])
    assert result.exit_code == 0
    assert "abcd-super-secret-9876" not in result.output
    assert "REDACTED" in result.output and "lr: 0.01" in result.output


def test_pipeline_prepare_train_generate_plot(tmp_path):
    write_corpus(tmp_path / "src", arithmetic_documents(400, seed=1), name="arith")
    cfg = write_config(
        tmp_path / "c.yaml",
        model={"preset": "tiny"},
        data={"sources": [str(tmp_path / "src")], "output_dir": str(tmp_path / "data"),
              "allowed_roots": [str(tmp_path)], "tokenizer": {"vocab_size": 300}},
        train={"data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "run"), "seq_len": 64,
               "batch_size": 4, "max_steps": 30, "lr": 3e-3, "eval_every": 15, "threads": 1},
        generate={"max_new_tokens": 8, "max_new_tokens_ceiling": 16},
    )
    prepared = runner.invoke(app, ["data", "prepare", "-c", str(cfg)])
    assert prepared.exit_code == 0, prepared.output
    assert "duplicates_dropped" in prepared.output and "train.tokens" in prepared.output
    trained = runner.invoke(app, ["train", "-c", str(cfg), "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert "val loss" in trained.output

    ckpt = str(tmp_path / "run")
    gen = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "3+4=", "--seed", "1", "--json"])
    assert gen.exit_code == 0, gen.output
    out = json.loads(gen.output)
    assert out["completion_tokens"] <= 8 and out["finish_reason"] in {"length", "eos", "stop"}
    # greedy decoding is deterministic
    greedy = ["generate", "--checkpoint", ckpt, "--prompt", "1+1=", "--temperature", "0"]
    assert runner.invoke(app, greedy).output == runner.invoke(app, greedy).output

    over = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "1", "--max-new-tokens", "17"])
    assert over.exit_code == 2 and "ceiling" in over.output and "16" in over.output
    long_prompt = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "1+1=2\n" * 200])
    assert long_prompt.exit_code == 2 and "prompt" in long_prompt.output

    plotted = runner.invoke(app, ["plot", str(tmp_path / "run")])
    assert plotted.exit_code == 0 and (tmp_path / "run" / "loss.png").exists()

    # a tampered checkpoint is refused before anything is loaded; --no-verify is explicit
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    tok = latest / "tokenizer.json"
    os.chmod(tok, 0o600)
    tok.write_text(tok.read_text().replace("endoftext", "endofteXt"))
    refused = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "1"])
    assert refused.exit_code == 2 and "SHA-256" in refused.output


def test_data_prepare_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data.allowed_roots is the current directory
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    result = runner.invoke(app, ["data", "prepare", "--source", str(tmp_path / "bin.txt"),
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "bin.txt" in result.output and "UTF-8" in result.output and "Traceback" not in result.output
    none = runner.invoke(app, ["data", "prepare", "--output", str(tmp_path / "out")])
    assert none.exit_code == 2 and "no data sources" in none.output


def test_generate_refuses_pickle_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(app, ["generate", "--checkpoint", str(bad), "--prompt", "x"])
    assert result.exit_code == 2 and "pickle" in result.output


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "bastion.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_paths_with_brackets_print_as_they_are(tmp_path):
    # rich would read "[x]" as markup and drop it (or fail on "[/x]"): paths print verbatim.
    from helpers import make_base_checkpoint

    ckpt = make_base_checkpoint(tmp_path / "run[bold]" / "a[/x]")
    result = runner.invoke(app, ["ckpt", "verify", str(ckpt)])
    assert result.exit_code == 0 and f"{ckpt}: OK" in result.output.replace("\n", "")
    missing = tmp_path / "no[/such]"
    result = runner.invoke(app, ["ckpt", "verify", str(missing)])
    assert result.exit_code == 2 and "no[/such]" in result.output
