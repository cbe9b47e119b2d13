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
    refuse_adapters_only,
    refuse_head,
    refuse_nonfinite,
    stored_quantization,
)
from bastion.checkpoint.safetensors_check import check_against_model
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.model import Transformer
from bastion.model.heads import base_weights_for
from bastion.model.lora import apply_lora, is_lora_state_name, merge_lora
from bastion.model.quantize import check_mode, quantize_model, restore_quantized, use_cpu_kernels
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.chat import ChatFormat


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: BastionTokenizer
    config: BastionConfig
    directory: Path
    chat: ChatFormat | None = None
    quantization: str | None = None  # "int8" / "int4": weight-only quantized (bastion/model/quantize.py)
    dtype: str = "float32"  # of the weights that are not quantized, and of the compute


INFERENCE_DTYPES = ("float32", "bfloat16")


def load_for_inference(path: str | Path, *, verify: bool = True, device: str | torch.device = "cpu",
                       head: Head = "lm", what: str = "checkpoint", quantize: str | None = None,
                       dtype: str = "float32") -> LoadedModel:
    """Verify (unless verify=False) and load a checkpoint's weights, tokenizer and config;
    refused unless its model has the `head` asked for (a language model by default: a reward
    model cannot generate).
    A LoRA run's checkpoint (adapters only) is loaded onto its verified base and merged.
    A quantized checkpoint (`bastion quantize`) is loaded as it was saved, never re-quantized.
    `quantize` ("int8" / "int4") quantizes a full-precision model's block weights after
    loading (torchao, weight-only; a quantized checkpoint must already be in that mode). On
    CPU a quantized model's Linears then run PyTorch's fused int8 / int4 kernels
    (`use_cpu_kernels`); on CUDA torchao's own.
    `dtype` "bfloat16" casts the loaded float32 model (weights, KV cache, compute) to bf16:
    half the memory, and on CPUs with bf16 matrix units (AMX) several times the batched
    throughput (docs/serving.md); not with quantization.
    Weights holding NaN or Inf are refused whatever checkpoint.reject_nonfinite says: they
    cannot generate anything (sampling fails on NaN probabilities)."""
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {str(dtype)[:40]!r}; choose one of {', '.join(INFERENCE_DTYPES)}")
    if quantize is not None:
        check_mode(quantize)  # before reading any weights
        if dtype != "float32":
            raise ConfigError("--dtype bfloat16 and --quantize are exclusive: the quantized linears pick their own "
                              "compute precision (docs/quantization.md)")
    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    config = checkpoint_config(ckpt)
    refuse_head(ckpt, config, head, what)
    refuse_nonfinite(ckpt, config, requested=True)  # the weights, or a LoRA run's adapters
    with torch.device("meta"):
        expected = Transformer(config.model).state_dict()  # names, shapes, dtypes; no memory
    stored = stored_quantization(ckpt)
    mode = None
    if stored is not None:
        refuse_adapters_only(ckpt, config, what)
        model, mode = _quantized_model(ckpt, config, stored, expected, device)
    elif adapters_only(config):
        model = _merged_lora_model(ckpt, config, expected, verify)
    else:
        check_against_model(ckpt.model, expected, ckpt.directory / "model.safetensors")
        model = Transformer.from_state_dict(config.model, ckpt.model).float()
    model.to(device).eval()
    if quantize is not None and mode is None:
        quantize_model(model, quantize)
        mode = quantize
    elif quantize is not None and quantize != mode:
        raise CheckpointError(f"--quantize {quantize}: {ckpt.directory} is already quantized ({mode}); quantize its "
                              "full-precision source instead")
    if mode is not None and dtype != "float32":
        raise CheckpointError(f"--dtype {dtype}: {ckpt.directory} is quantized ({mode}); load it without --dtype")
    if mode is not None and torch.device(device).type == "cpu":
        use_cpu_kernels(model)
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    tokenizer = checkpoint_tokenizer(ckpt)
    return LoadedModel(model, tokenizer, config, ckpt.directory, checkpoint_chat(ckpt, tokenizer), mode, dtype)


def _merged_lora_model(ckpt, config: BastionConfig, expected: dict[str, torch.Tensor], verify: bool) -> Transformer:
    base, base_config = load_full_model(lora_base(ckpt), what="LoRA base", verify=verify, reject_nonfinite=True,
                                        head="any")  # a classifier may be LoRA-tuned further
    weights = base_weights_for(base.model, base_config.model, config.model.score_labels)
    check_against_model(weights, expected, base.directory / "model.safetensors")
    model = Transformer.from_state_dict(config.model, weights).float()
    apply_lora(model, config.finetune.lora)
    adapters = {k: v for k, v in ckpt.model.items() if is_lora_state_name(k)}
    load_lora_state_dict(model, adapters, ckpt.directory / "model.safetensors")
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _quantized_model(ckpt, config: BastionConfig, stored, expected: dict[str, torch.Tensor],
                     device: str | torch.device) -> tuple[Transformer, str]:
    """The model of a quantized checkpoint: its stored description and inner tensors checked
    and rebuilt into torchao's tensor subclasses (bastion/model/quantize.py), every other
    tensor checked against the config as for any checkpoint."""
    where = ckpt.directory / "model.safetensors"
    plain, quantized, mode = restore_quantized(ckpt.model, stored, config.model,
                                               f"{ckpt.directory}/trainer_state.json", device=device)
    check_against_model(plain, {k: v for k, v in expected.items() if k not in quantized}, where)
    model = Transformer.from_state_dict(config.model, plain | quantized)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, mode


__all__ = ["LoadedModel", "load_for_inference"]
