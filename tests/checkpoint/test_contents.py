"""What a checkpoint says about its model (bastion/checkpoint/contents.py): NaN / Inf weights
are refused as the caller and the checkpoint's own config say (exports and inference always),
and its tokenizer is refused unless every id indexes the model's embedding."""
import json

import pytest
import torch
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint, save_checkpoint
from bastion.checkpoint.contents import checkpoint_tokenizer, load_full_model
from bastion.cli import app
from bastion.config import build_config
from bastion.config.load import parse_yaml, to_yaml
from bastion.errors import CheckpointError
from helpers import make_base_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_checkpoint(tmp_path_factory.mktemp("base"))


def derived(base, root, *, nan: bool = False, reject_nonfinite: bool = False, tokenizer=None):
    """A copy of `base` saved anew: a NaN in one weight, checkpoint.reject_nonfinite set, or
    another tokenizer.json."""
    ckpt = load_checkpoint(base)
    if nan:
        ckpt.model = {name: tensor.clone() for name, tensor in ckpt.model.items()}
        ckpt.model[min(ckpt.model)].view(-1)[0] = float("nan")
    raw = parse_yaml(ckpt.config_yaml, "config")
    raw["checkpoint"]["reject_nonfinite"] = reject_nonfinite
    ckpt.config_yaml = to_yaml(build_config(raw, interpolate_env=False))
    if tokenizer is not None:
        ckpt.tokenizer_json = json.dumps(tokenizer)
    return save_checkpoint(root, 1, ckpt)


def test_full_model_loader_honours_the_checkpoints_reject_nonfinite(base, tmp_path):
    allowed = derived(base, tmp_path / "allowed", nan=True)
    ckpt, _ = load_full_model(allowed)  # neither the caller nor the checkpoint asks
    assert torch.isnan(ckpt.model[min(ckpt.model)]).any()
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_full_model(allowed, reject_nonfinite=True)
    refused = derived(base, tmp_path / "refused", nan=True, reject_nonfinite=True)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_full_model(refused)


@pytest.mark.parametrize("command", ["export hf", "export gguf", "generate"])
def test_exports_and_generation_always_refuse_nonfinite_weights(base, tmp_path, command):
    """An export leaves Bastion's checks behind and NaN weights cannot generate anything
    (sampling fails on NaN probabilities): refused even with checkpoint.reject_nonfinite off."""
    path = derived(base, tmp_path / "run", nan=True)
    argv = {"export hf": ["export", "hf", str(path), str(tmp_path / "hf")],
            "export gguf": ["export", "gguf", str(path), str(tmp_path / "m.gguf")],
            "generate": ["generate", "--checkpoint", str(path), "-p", "hi", "--max-new-tokens", "3"]}[command]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and "NaN or Inf" in result.output, (result.exception, result.output[-300:])
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_tokenizer_ids_must_fit_the_models_embedding(base, tmp_path):
    """A token id past model.vocab_size (within the tokenizer's own gap allowance) would
    crash generation with an IndexError in the embedding."""
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    vocab_size = len(tokenizer["model"]["vocab"])
    tokenizer["model"]["vocab"]["a"] = vocab_size + 50
    path = derived(base, tmp_path / "run", tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=rf"tokenizer.json: token id {vocab_size + 50} is outside the model's vocab_size"):
        checkpoint_tokenizer(load_checkpoint(path))
    result = runner.invoke(app, ["generate", "--checkpoint", str(path), "-p", "a a", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "outside the model's vocab_size" in result.output, result.output[-300:]

