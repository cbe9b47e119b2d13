"""Load a verified checkpoint for inference: model (eval mode), tokenizer, chat format, config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.checkpoint import Checkpoint
from bastion.checkpoint.safetensors_check import check_against_model, check_finite
from bastion.config.load import build_config
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.chat import ChatFormat

# trainer_state.json keys that describe the tokenizer rather than the run; fine-tuning copies
# them from the checkpoint it starts from, so they follow a model through every stage.
TOKENIZER_STATE_KEYS = ("special_tokens", "chat_template", "imported_from")


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: BastionTokenizer
    config: BastionConfig
    directory: Path
    chat: ChatFormat | None = None


def tokenizer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The TOKENIZER_STATE_KEYS a checkpoint carries (an imported model's specials, template)."""
    return {k: ckpt.trainer_state[k] for k in TOKENIZER_STATE_KEYS if k in ckpt.trainer_state}


def special_tokens(ckpt: Checkpoint) -> dict[str, str | None]:
    stored = ckpt.trainer_state.get("special_tokens")
    if not isinstance(stored, dict):
        return {"bos_token": None, "eos_token": None, "pad_token": None}
    return {k: stored.get(k) if isinstance(stored.get(k), str) else None for k in ("bos_token", "eos_token", "pad_token")}


def tokenizer_from_checkpoint(ckpt: Checkpoint) -> BastionTokenizer:
    """The checkpoint's tokenizer with its own eos/pad/bos (Bastion's when none recorded)."""
    return BastionTokenizer.from_json_str(ckpt.tokenizer_json, **special_tokens(ckpt))


def chat_format_from_checkpoint(ckpt: Checkpoint, tokenizer: BastionTokenizer) -> ChatFormat:
    """The checkpoint's chat template (imported with the model), else Bastion's default."""
    template = ckpt.trainer_state.get("chat_template")
    return ChatFormat(tokenizer, template if isinstance(template, str) else None,
                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def config_from_checkpoint(ckpt: Checkpoint) -> BastionConfig:
    try:
        raw = yaml.safe_load(ckpt.config_yaml) or {}
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{ckpt.directory}/config.yaml: invalid YAML ({exc})") from None
    return build_config(raw, source=f"{ckpt.directory}/config.yaml")


def load_for_inference(path: str | Path, *, verify: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify (unless verify=False) and load a checkpoint's weights, tokenizer and config."""
    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    config = config_from_checkpoint(ckpt)
    model = Transformer(config.model)
    check_against_model(ckpt.model, model.state_dict(), ckpt.directory / "model.safetensors")
    if config.checkpoint.reject_nonfinite:
        check_finite(ckpt.model, ckpt.directory)
    model.load_state_dict(ckpt.model)
    model.to(device).eval()
    tokenizer = tokenizer_from_checkpoint(ckpt)
    return LoadedModel(model, tokenizer, config, ckpt.directory, chat_format_from_checkpoint(ckpt, tokenizer))


__all__ = ["LoadedModel", "TOKENIZER_STATE_KEYS", "chat_format_from_checkpoint", "config_from_checkpoint",
           "load_for_inference", "special_tokens", "tokenizer_from_checkpoint", "tokenizer_state"]
