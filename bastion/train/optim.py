"""AdamW construction and its state as flat tensors (safetensors) + JSON (no pickle)."""
from __future__ import annotations

import json
from typing import Any

import torch

from bastion.config.schema import TrainConfig
from bastion.errors import CheckpointError
from bastion.safeio import parse_json


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool | None = None) -> torch.optim.AdamW:
    groups = model.param_groups(cfg.weight_decay)
    # The fused kernel updates every parameter in one pass (CUDA, and CPU since torch 2.4):
    # on the CPU it halves optimizer time against the per-tensor loop.
    fused = (device.type in ("cuda", "cpu") or None) if fused is None else fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


# How a step is computed (kernels), not what the optimizer has learned: the running
# optimizer's own choice wins over the checkpoint's (e.g. a fused CPU run resumed under FSDP).
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def state_dict_to_tensors(sd: dict[str, Any], class_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an index-keyed optimizer state dict to {"state.<param index>.<key>": tensor}
    + JSON metadata (param_groups, class)."""
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": json.dumps(groups), "class": class_name}


def tensors_to_state_dict(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict[str, str]) -> dict[str, Any]:
    """The index-keyed state dict `state_dict_to_tensors` flattened, checked against `optimizer`."""
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint optimizer is {meta.get('class')!r}, the run uses {type(optimizer).__name__}")
    if not isinstance(meta.get("param_groups"), str):
        raise CheckpointError("optimizer.safetensors: missing param_groups metadata")
    groups = parse_json(meta["param_groups"], CheckpointError, "optimizer.safetensors: param_groups metadata")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError("optimizer.safetensors: param_groups metadata is not a list of objects")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"optimizer state has {len(groups)} parameter groups, the run has {len(optimizer.param_groups)}")
    for group, current in zip(groups, optimizer.param_groups):
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        for flag in IMPLEMENTATION_FLAGS:
            if flag in current:
                group[flag] = current[flag]
    state: dict[int, dict[str, torch.Tensor]] = {}
    # A fixed order (safetensors may hand tensors back in any order, and that order can differ
    # between processes): sharded runs gather optimizer state in this order on every rank.
    for name in sorted(tensors, key=lambda n: (int(n.split(".", 2)[1]), n)):
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensors[name]
    return {"state": state, "param_groups": groups}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten `optimizer.state_dict()` to {"state.<param index>.<key>": tensor} + JSON metadata."""
    return state_dict_to_tensors(optimizer.state_dict(), type(optimizer).__name__)


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    try:
        optimizer.load_state_dict(tensors_to_state_dict(optimizer, tensors, meta))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit this model: {exc}") from None
