"""Load a verified checkpoint for inference: model (eval mode), tokenizer, config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bastion.checkpoint import load_checkpoint
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
    missing, unexpected = model.load_state_dict(ckpt.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.directory}/model.safetensors does not fit the model in config.yaml "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.to(device).eval()
    tokenizer = BastionTokenizer.from_json_str(ckpt.tokenizer_json)
    return LoadedModel(model, tokenizer, config, ckpt.directory)
