"""`bastion ckpt ...` through the real CLI."""
import json
import os

import torch
from typer.testing import CliRunner

from bastion.checkpoint import Checkpoint, list_checkpoints, save_checkpoint
from bastion.cli import app

runner = CliRunner()


def make(root, step, value=1.0):
    model = {"w": torch.full((64, 64), value), "b": torch.arange(64.0)}
    return save_checkpoint(root, step, Checkpoint(model=model, trainer_state={"step": step, "val_loss": 1.0 / step},
                                                  config_yaml="a: 1\n", tokenizer_json="{}"))


def test_verify_and_inspect(tmp_path):
    path = make(tmp_path, 5)
    ok = runner.invoke(app, ["ckpt", "verify", str(tmp_path)])
    assert ok.exit_code == 0 and "OK" in ok.output and "2 tensors" in ok.output
    info = runner.invoke(app, ["ckpt", "inspect", str(path), "--json"])
    data = json.loads(info.output)
    assert data["step"] == 5 and data["tensors"]["model.safetensors"]["w"] == {"dtype": "F32", "shape": [64, 64]}
    table = runner.invoke(app, ["ckpt", "inspect", str(path)])
    assert "model.safetensors" in table.output and "4,160" in table.output  # 64*64 + 64 parameters
    os.chmod(path / "config.yaml", 0o600)
    (path / "config.yaml").write_text("a: 2\n")
    bad = runner.invoke(app, ["ckpt", "verify", str(path)])
    assert bad.exit_code == 2 and "config.yaml" in bad.output and "SHA-256" in bad.output


def test_prune_dry_run_then_for_real(tmp_path):
    for step in range(1, 6):
        make(tmp_path, step)
    dry = runner.invoke(app, ["ckpt", "prune", str(tmp_path), "--keep-last", "2", "--dry-run"])
    assert dry.output.count("would delete") == 3 and len(list_checkpoints(tmp_path)) == 5
    real = runner.invoke(app, ["ckpt", "prune", str(tmp_path), "--keep-last", "2", "--keep-every", "2"])
    assert real.exit_code == 0
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["2", "4", "5"]


def test_pack_unpack_round_trip_and_delta(tmp_path):
    base = make(tmp_path / "a", 1, 1.0)
    newer = make(tmp_path / "b", 2, 1.0)
    packed = runner.invoke(app, ["ckpt", "pack", str(newer), str(tmp_path / "packed"), "--base", str(base)])
    assert packed.exit_code == 0, packed.output
    no_base_verify = runner.invoke(app, ["ckpt", "verify", str(tmp_path / "packed")])
    assert no_base_verify.exit_code == 2 and "pass that checkpoint as base" in no_base_verify.output
    assert runner.invoke(app, ["ckpt", "verify", str(tmp_path / "packed"), "--base", str(base)]).exit_code == 0
    no_base = runner.invoke(app, ["ckpt", "unpack", str(tmp_path / "packed"), str(tmp_path / "x")])
    assert no_base.exit_code == 2
    restored = runner.invoke(app, ["ckpt", "unpack", str(tmp_path / "packed"), str(tmp_path / "restored"),
                                   "--base", str(base)])
    assert restored.exit_code == 0, restored.output
    assert (tmp_path / "restored" / "model.safetensors").read_bytes() == (newer / "model.safetensors").read_bytes()


def test_convert_needs_allow_pickle(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    refused = runner.invoke(app, ["ckpt", "convert", str(src), str(tmp_path / "out")])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    done = runner.invoke(app, ["ckpt", "convert", str(src), str(tmp_path / "out"), "--allow-pickle"])
    assert done.exit_code == 0 and runner.invoke(app, ["ckpt", "verify", str(tmp_path / "out")]).exit_code == 0
