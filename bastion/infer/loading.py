"""Load a verified checkpoint for inference: model (eval mode), tokenizer, chat format, config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bastion.adapters.folder import load_lora_state_dict
from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import (
    adapters_only,
    checkpoint_chat,
    checkpoint_config,
    checkpoint_tokenizer,
    load_full_model,
    Head,
    lora_base,
    refuse_head,
    refuse_nonfinite,
)
from bastion.checkpoint.safetensors_check import check_against_model
from bastion.config.schema import BastionConfig
from bastion.model import Transformer
from bastion.model.lora import apply_lora, is_lora_name, merge_lora
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.chat import ChatFormat


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: BastionTokenizer
    config: BastionConfig
    directory: Path
    chat: ChatFormat | None = None


def load_for_inference(path: str | Path, *, verify: bool = True, device: str | torch.device = "cpu",
                       head: Head = "lm", what: str = "checkpoint") -> LoadedModel:
    """Verify (unless verify=False) and load a checkpoint's weights, tokenizer and config;
    refused unless its model has the `head` asked for (a language model by default: a reward
    model cannot generate).
    A LoRA run's checkpoint (adapters only) is loaded onto its verified base and merged.
    Weights holding NaN or Inf are refused whatever checkpoint.reject_nonfinite says: they
    cannot generate anything (sampling fails on NaN probabilities)."""
    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    config = checkpoint_config(ckpt)
    refuse_head(ckpt, config, head, what)
    refuse_nonfinite(ckpt, config, requested=True)  # the weights, or a LoRA run's adapters
    with torch.device("meta"):
        expected = Transformer(config.model).state_dict()  # names, shapes, dtypes; no memory
    if adapters_only(config):
        base, _ = load_full_model(lora_base(ckpt), what="LoRA base", verify=verify, reject_nonfinite=True)
        check_against_model(base.model, expected, base.directory / "model.safetensors")
        model = Transformer.from_state_dict(config.model, base.model).float()
        apply_lora(model, config.finetune.lora)
        adapters = {k: v for k, v in ckpt.model.items() if is_lora_name(k)}
        load_lora_state_dict(model, adapters, ckpt.directory / "model.safetensors")
        merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        check_against_model(ckpt.model, expected, ckpt.directory / "model.safetensors")
        model = Transformer.from_state_dict(config.model, ckpt.model).float()
    model.to(device).eval()
    tokenizer = checkpoint_tokenizer(ckpt)
    return LoadedModel(model, tokenizer, config, ckpt.directory, checkpoint_chat(ckpt, tokenizer))


__all__ = ["LoadedModel", "load_for_inference"]
