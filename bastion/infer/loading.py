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


def _lora_base(ckpt: Checkpoint, verify: bool) -> Checkpoint:
    """The base checkpoint of a LoRA run's checkpoint (which holds only adapters): the one
    recorded in trainer_state "init_from", refused unless its MANIFEST.json hash matches."""
    from bastion.model.lora import BASE_SHA_KEY, manifest_sha256

    recorded = ckpt.trainer_state.get("init_from") or {}
    base_path, base_sha = recorded.get("path"), ckpt.trainer_state.get(BASE_SHA_KEY)
    if not isinstance(base_path, str) or not isinstance(base_sha, str):
        raise CheckpointError(f"{ckpt.directory}: LoRA checkpoint without a recorded base (trainer_state init_from)")
    if not Path(base_path).exists():
        raise CheckpointError(f"{ckpt.directory}: holds LoRA adapters for the base {base_path}, which is gone; "
                              "merge them (`bastion merge BASE RUN OUT`) with the base wherever it is now")
    if manifest_sha256(base_path) != base_sha:
        raise CheckpointError(f"{ckpt.directory}: its base {base_path} has changed since training "
                              "(MANIFEST.json hash differs); refusing to apply the adapters to it")
    return load_checkpoint(base_path, verify=verify, load_optimizer=False)


def load_for_inference(path: str | Path, *, verify: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Verify (unless verify=False) and load a checkpoint's weights, tokenizer and config.
    A LoRA run's checkpoint (adapters only) is loaded onto its verified base and merged."""
    from bastion.model.lora import is_lora_name

    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    config = config_from_checkpoint(ckpt)
    with torch.device("meta"):
        expected = Transformer(config.model).state_dict()  # names, shapes, dtypes; no memory
    adapters = {k: v for k, v in ckpt.model.items() if is_lora_name(k)}
    if adapters:
        from bastion.model.lora import apply_lora, load_lora_state_dict, merge_lora

        base = _lora_base(ckpt, verify)
        check_against_model(base.model, expected, base.directory / "model.safetensors")
        model = Transformer.from_state_dict(config.model, base.model).float()
        apply_lora(model, config.finetune.lora)
        load_lora_state_dict(model, adapters, ckpt.directory / "model.safetensors")
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        check_against_model(ckpt.model, expected, ckpt.directory / "model.safetensors")
        if config.checkpoint.reject_nonfinite:
            check_finite(ckpt.model, ckpt.directory)
        model = Transformer.from_state_dict(config.model, ckpt.model).float()
    model.to(device).eval()
    tokenizer = tokenizer_from_checkpoint(ckpt)
    return LoadedModel(model, tokenizer, config, ckpt.directory, chat_format_from_checkpoint(ckpt, tokenizer))


__all__ = ["LoadedModel", "TOKENIZER_STATE_KEYS", "chat_format_from_checkpoint", "config_from_checkpoint",
           "load_for_inference", "special_tokens", "tokenizer_from_checkpoint", "tokenizer_state"]
