"""`export_peft`: a Bastion LoRA adapter folder -> a Hugging Face PEFT adapter folder.

Output (what `peft.PeftModel.from_pretrained(hf_model, folder)` loads, with the base
exported by `export_hf`):

    adapter_config.json        PEFT LoraConfig: peft_type LORA, task_type CAUSAL_LM, r,
                               lora_alpha, lora_dropout, target_modules in HF names
                               (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj), bias none
    adapter_model.safetensors  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...

PEFT computes base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r, which is Bastion's
LoRALinear exactly, and both store A as [r, in] and B as [out, r], so tensors are only
renamed. The adapter folder is verified (manifest, SHA-256, strict safetensors header)
before anything is written; the output folder appears by atomic rename.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bastion.adapters.folder import Adapter, read_adapter, write_new_dir
from bastion.config.schema import LoraConfig
from bastion.errors import CheckpointError
from bastion.model.hf import HF_MODULE_NAMES, hf_name

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_tensor_name(ours: str) -> str:
    """"layers.0.attention.wq.lora_A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    module, _, which = ours.rpartition(".")
    if which not in ("lora_A", "lora_B"):
        raise KeyError(f"not a LoRA tensor name: {ours!r}")
    return f"{PEFT_PREFIX}{hf_name(module)}.{which}.weight"


def peft_config(rank: int, alpha: float, dropout: float, target_modules: list[str],
                base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's LoraConfig as a dict (fields every PEFT release since 0.9 understands)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(HF_MODULE_NAMES[t] for t in dict.fromkeys(target_modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _refuse_score_head(adapter: Adapter) -> None:
    """A classify / regress run's folder carries its trained score head; a CAUSAL_LM PEFT
    folder has no place for it, so exporting the adapters alone would lose half the model."""
    if adapter.head is not None:
        raise CheckpointError(f"{adapter.directory}: holds a train.objective {adapter.head.objective} score head "
                              "beside its adapters, which a PEFT export does not carry yet; merge the run "
                              "(`bastion merge BASE RUN_DIR OUT`) and `bastion export hf` the merged classifier")


def export_peft(adapter_dir: str | Path, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_dir` (from `save_adapter`) as a PEFT folder at `out_dir` (must not exist
    or be empty). `base_model_name_or_path` is recorded in adapter_config.json (informational:
    PeftModel.from_pretrained takes the base model as an argument); e.g. the `export_hf`
    folder of the base checkpoint. Returns out_dir."""
    adapter = read_adapter(adapter_dir)
    _refuse_score_head(adapter)
    files = peft_files(adapter.tensors, adapter.config, adapter.directory, base_model_name_or_path)
    return write_new_dir(out_dir, files)


def peft_files(tensors: dict[str, torch.Tensor], cfg: LoraConfig, where: str | Path,
               base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors for LoRA `tensors` (Bastion names,
    lora_A / lora_B only) trained with `cfg`; `where` names their source in errors."""
    try:
        renamed = {peft_tensor_name(k): v.contiguous() for k, v in tensors.items()}
    except KeyError as exc:
        raise CheckpointError(f"{where}: {exc.args[0]}") from None
    config = peft_config(cfg.rank, cfg.alpha, cfg.dropout, list(cfg.target_modules), base_model_name_or_path)
    return {
        PEFT_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
        PEFT_WEIGHTS: safetensors.torch.save(renamed, metadata={"format": "pt"}),
    }


__all__ = ["export_peft", "peft_config", "peft_files", "peft_tensor_name"]
