"""LoRA: low-rank adapters on the attention / MLP projections, saved apart from the base.

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)       A: [rank, in], B: [out, rank]

A starts Kaiming-uniform and B at zero (as PEFT does), so a freshly wrapped model computes
exactly what the base did. `apply_lora` wraps the target projections of every layer and
freezes everything else (embeddings, norms, lm_head, the wrapped base weights).

State-dict names. A `LoRALinear` registers the base layer's own `weight` / `bias` Parameters
on itself (the same tensors, not copies) next to `lora_A` / `lora_B`, so a wrapped model's
keys are the base keys plus two per wrapped module:

    layers.0.attention.wq.weight    unchanged: base checkpoints load into a wrapped model
    layers.0.attention.wq.bias      (with qkv_bias)
    layers.0.attention.wq.lora_A    new, trainable
    layers.0.attention.wq.lora_B    new, trainable

No state-dict hooks are needed, and `merge_lora` puts the same Parameters back into a plain
nn.Linear, so the merged model's state dict is exactly a base state dict.

QLoRA (`finetune.lora.base_quantization` nf4 / int8): `quantize_lora_base` replaces the
frozen base weight of every LoRALinear by a quantized one (bastion/model/qlora.py) in place,
once the base is loaded; lora_A / lora_B and their compute stay in the training dtype. The
adapters' names, shapes and files are those of plain LoRA.

This module is the layers only. Adapters as files (adapter folders, loading them onto a
model, merging them into their base checkpoint) are bastion/adapters/.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bastion.config.schema import LoraConfig
from bastion.errors import ConfigError
from bastion.model.qlora import MODES, int8_linear, int8_rowwise, nf4_fits, tensor_bytes, to_nf4

# Short target name -> the sub-module of a layer that holds it.
TARGETS: dict[str, str] = {
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward",
}
LORA_SUFFIXES = (".lora_A", ".lora_B")
# Whole tensors that train beside the adapters and travel with them (PEFT's modules_to_save):
# a scoring model's head (bastion/model/heads.py) is new, so a frozen one would score nothing.
SAVED_WHOLE = ("score.weight",)
_MODULE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Holds the base's `weight` and
    `bias` Parameters itself, so its state-dict keys for them are those of the nn.Linear
    it replaces."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        if rank < 1 or not alpha > 0 or not 0.0 <= dropout < 1.0:
            raise ValueError("LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what PEFT (and nn.Linear) use
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # `lora_disabled`: the base layer alone (e.g. a KL reference)
        self.base_quantization = "none"  # "nf4" / "int8" after quantize_base (QLoRA)
        self.register_buffer("weight_scale", None, persistent=False)  # int8: one scale per output row

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base layer alone. An NF4 weight goes through torchao's linear_nf4
        (F.linear dispatches to it), an int8 one through qlora.int8_linear."""
        if self.weight_scale is not None:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def quantize_base(self, mode: str) -> bool:
        """Hold the frozen base weight quantized (`mode` nf4 or int8, bastion/model/qlora.py),
        on its device; the full-precision weight is dropped. False, and the weight left as it
        is, when nf4 cannot hold its shape (element count not a multiple of 16,384)."""
        if self.base_quantization != "none":
            raise ValueError(f"the base weight is already quantized ({self.base_quantization})")
        if mode == "nf4":
            if not nf4_fits(self.weight.shape):
                return False
            self.weight = nn.Parameter(to_nf4(self.weight), requires_grad=False)
        elif mode == "int8":
            values, scale = int8_rowwise(self.weight)
            self.weight = nn.Parameter(values, requires_grad=False)
            self.weight_scale = scale
        else:
            raise ValueError(f"unknown base quantization {mode!r}; choose nf4 or int8")
        self.base_quantization = mode
        return True

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding weight + B @ A * scaling (computed in float32). The
        weight Parameter is updated in place and reused: do not call twice."""
        if self.base_quantization != "none":
            raise ValueError("cannot merge into a quantized base weight; merge the adapter into the full-precision "
                             "base checkpoint instead (bastion merge)")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        base = "" if self.base_quantization == "none" else f", base={self.base_quantization}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}{base}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in model order (pass the raw model, not a DDP / compiled wrapper)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The model without its adapters while inside: the frozen base, so an objective that needs
    the starting policy as a reference (GRPO's KL) keeps no second model in memory."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m in modules:
            m.disabled = False


def _check_targets(targets: list[str]) -> list[str]:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"finetune.lora.target_modules: unknown module(s) {unknown}; choose from wq wk wv wo w1 w2 w3",
                          [("finetune.lora.target_modules", f"unknown module(s) {unknown}")])
    if not targets:
        raise ConfigError("finetune.lora.target_modules is empty", [("finetune.lora.target_modules", "empty")])
    return list(dict.fromkeys(targets))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the `cfg.target_modules` projections of every layer with LoRALinear and freeze
    every other parameter. Returns the wrapped module names ("layers.0.attention.wq", ...).
    A scoring model's head (`score.weight`) stays trainable and is saved with the adapters.
    Call it after loading the base weights and before building the optimizer."""
    targets = _check_targets(list(cfg.target_modules))
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters (apply_lora was called twice)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in SAVED_WHOLE)
    wrapped = []
    for name, module in list(model.named_modules()):
        m = _MODULE.match(name)
        if m is None or m.group(3) not in targets or not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        lora = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout)
        lora.train(module.training)  # a model already in eval mode must not get training-mode dropout
        setattr(parent, m.group(3), lora)
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"no module of the model matches LoRA targets {targets}")
    return wrapped


@dataclass
class QuantizedBase:
    """The wrapped base weights of a QLoRA model: those held quantized and those left in full
    precision (nf4: shapes it cannot hold), with their bytes in the training dtype and now."""

    mode: str
    quantized: list[str] = field(default_factory=list)  # weight names, "layers.0.attention.wq.weight"
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the wrapped base weights in the training dtype
    bytes_after: int = 0  # as they are held now (quantized values and scales, plus those kept)

    def describe(self) -> str:
        kept = f", {len(self.kept)} kept in full precision (not a multiple of 16,384 values)" if self.kept else ""
        return (f"QLoRA: {len(self.quantized)} frozen base weights in {self.mode}{kept}, "
                f"{self.bytes_before / 2**20:,.1f} -> {self.bytes_after / 2**20:,.1f} MiB")


def quantized_base(model: nn.Module, mode: str) -> QuantizedBase:
    """What the model's LoRA modules hold as their base weights (see quantize_lora_base)."""
    report = QuantizedBase(mode)
    for name, module in lora_modules(model).items():
        # lora_A is made in the dtype the base weight had, the training dtype.
        report.bytes_before += module.weight.numel() * module.lora_A.element_size()
        report.bytes_after += tensor_bytes(module.weight)
        if module.weight_scale is not None:
            report.bytes_after += tensor_bytes(module.weight_scale)
        (report.quantized if module.base_quantization != "none" else report.kept).append(f"{name}.weight")
    return report


def quantize_lora_base(model: nn.Module, mode: str) -> QuantizedBase:
    """Quantize the frozen base weight of every LoRALinear of `model` in place, one at a time
    (each full-precision weight is dropped as its quantized form replaces it, so memory never
    holds two copies of the base). Only LoRA-wrapped weights are touched: the embedding, the
    norms, the lm head and unwrapped projections stay as they are. Call it after apply_lora
    and before building the optimizer, with the model on its training device."""
    if mode not in MODES or mode == "none":
        raise ConfigError(f"finetune.lora.base_quantization: unknown value {str(mode)[:40]!r} to quantize with; "
                          "choose nf4 or int8", [("finetune.lora.base_quantization", "unknown value")])
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("finetune.lora.base_quantization needs LoRA adapters on the model (apply_lora first)")
    for module in modules.values():
        module.quantize_base(mode)
    report = quantized_base(model, mode)
    # DDP broadcasts every parameter and buffer from rank 0 when it wraps the model (and
    # buffers before each forward); these are frozen and identical on every rank (each
    # quantizes the same verified base), so DDP leaves them alone.
    ignored = list(report.quantized)
    if mode == "int8":
        ignored += [name.removesuffix(".weight") + ".weight_scale" for name in report.quantized]
    model._ddp_params_and_buffers_to_ignore = ignored
    return report


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run trains and saves (detached): {"layers.N.attention.wq.lora_A": ...,
    ".lora_B": ...}, plus "score.weight" on a scoring model (SAVED_WHOLE)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    if out:
        params = dict(model.named_parameters())
        out.update({name: params[name].detach() for name in SAVED_WHOLE if name in params})
    return out


def is_lora_name(name: str) -> bool:
    """Whether a tensor is an adapter's (lora_A / lora_B)."""
    return name.endswith(LORA_SUFFIXES)


def is_lora_state_name(name: str) -> bool:
    """Whether a tensor belongs to what a LoRA run saves: an adapter, or a SAVED_WHOLE head."""
    return is_lora_name(name) or name in SAVED_WHOLE


def lora_module_name(tensor_name: str) -> str | None:
    """"layers.3.attention.wq.lora_A" -> "layers.3.attention.wq"; None unless the name is an
    adapter tensor of a module LoRA can wrap."""
    module, _, suffix = tensor_name.rpartition(".")
    return module if "." + suffix in LORA_SUFFIXES and _MODULE.match(module) else None


def lora_settings(model: nn.Module) -> tuple[set[str], int, float] | None:
    """(target short names, rank, alpha) of the model's LoRA modules; None without any."""
    modules = lora_modules(model)
    if not modules:
        return None
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("the model's LoRA modules disagree on rank / alpha")
    return {_MODULE.match(n).group(3) for n in modules}, ranks.pop(), alphas.pop()


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W += B @ A * alpha / rank) and put plain
    nn.Linear modules back; returns the merged module names. The model's state dict is then
    a base state dict again. requires_grad flags are left as they were (all frozen after
    apply_lora)."""
    merged = []
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
        merged.append(name)
    return merged


__all__ = ["LORA_SUFFIXES", "LoRALinear", "QuantizedBase", "SAVED_WHOLE", "TARGETS", "apply_lora", "is_lora_name",
           "is_lora_state_name", "lora_disabled",
           "lora_module_name", "lora_modules", "lora_settings", "lora_state_dict", "merge_lora", "quantize_lora_base",
           "quantized_base"]
