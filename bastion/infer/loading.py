"""Load a verified checkpoint for inference: model (eval mode), tokenizer, config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.safetensors_check import check_against_model, check_finite
from bastion.config.load import build_config
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: BastionTokenizer
    config: BastionConfig
    directory: Path


def load_for_inference(path: str | Path, *, verify: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify (unless verify=False) and load a checkpoint's weights, tokenizer and config."""
    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    try:
        raw = yaml.safe_load(ckpt.config_yaml) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{ckpt.directory}/config.yaml: invalid YAML ({exc})") from None
    config = build_config(raw, source=f"{ckpt.directory}/config.yaml")
    model = Transformer(config.model)
    check_against_model(ckpt.model, model.state_dict(), ckpt.directory / "model.safetensors")
    if config.checkpoint.reject_nonfinite:
        check_finite(ckpt.model, ckpt.directory)
    model.load_state_dict(ckpt.model)
    model.to(device).eval()
    tokenizer = BastionTokenizer.from_json_str(ckpt.tokenizer_json)
    return LoadedModel(model, tokenizer, config, ckpt.directory)
