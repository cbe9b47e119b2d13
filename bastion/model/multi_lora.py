"""Multi-LoRA inference: one base model, several LoRA adapters, chosen per batch row.

`install_adapters` wraps every projection that at least one adapter targets in a
`MultiLoRALinear`, which keeps the base layer as it is (unmerged, shared by every adapter;
a quantized or bf16 layer works the same) and holds all adapters stacked:

    lora_A   [n + 1, r, in]     slot 0 is all zeros: "no adapter" (the base)
    lora_B   [n + 1, out, r]    r = the largest rank; a smaller rank is zero-padded
    scaling  [n + 1]            alpha / rank of each adapter (0 for slot 0)

Before a forward, the caller says which adapter each batch row uses (`AdapterSet.rows`, a
context manager; the engine does it for every prefill and decode step). Each layer then
gathers its rows' A and B and adds

    y[b] = base(x)[b] + (x[b] @ A[i_b]^T @ B[i_b]^T) * scaling[i_b]

with two batched matmuls (bmm): LoRALinear's own arithmetic, row by row. A row's delta
depends on that row's input and adapter only, and with fixed shapes (the engine's padded
mode) the bmm runs the same kernel whatever the other rows hold, so a request's output is
bit-identical whether it runs alone or batched with requests for other adapters or the base.
Zero-padding a smaller rank adds exact zeros.

No rows set (or every row the base): the layer is its base layer, nothing else computed.
The row selection is state on the model, so one thread runs a model with adapters at a
time (the engine's thread does; generate() on the same model meanwhile would see the
engine's rows).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bastion.config.schema import LoraConfig

BASE = 0  # the adapter index of rows that use the base alone
_MODULE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


@dataclass
class ServedAdapter:
    """One adapter to serve: its name, settings and lora_A / lora_B tensors (as in
    adapter.safetensors: "layers.0.attention.wq.lora_A", ...)."""

    name: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]


class _Rows:
    """The adapter index of every batch row for the forward being run, shared by all the
    model's MultiLoRALinear layers. `index` None: every row is the base."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A base layer plus n stacked LoRA adapters, one chosen per batch row (module docstring)."""

    def __init__(self, base: nn.Module, n_adapters: int, rank: int, rows: _Rows, *, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._rows = rows
        slots = n_adapters + 1
        self.register_buffer("lora_A", torch.zeros(slots, rank, self.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(slots, self.out_features, rank, dtype=dtype, device=device))
        # float32 whatever the model's dtype: alpha / rank is a Python float in LoRALinear.
        self.register_buffer("scaling", torch.zeros(slots, dtype=torch.float32, device=device))

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        rank = lora_A.shape[0]
        self.lora_A[slot, :rank] = lora_A.to(self.lora_A.dtype)
        self.lora_B[slot, :, :rank] = lora_B.to(self.lora_B.dtype)
        self.scaling[slot] = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        index = self._rows.index
        if index is None:
            return y
        if index.numel() != x.shape[0]:
            raise ValueError(f"adapter rows: {index.numel()} indices for a batch of {x.shape[0]} rows")
        rows = x.reshape(x.shape[0], -1, self.in_features)  # [B, T, in]
        low = torch.bmm(rows, self.lora_A[index].transpose(1, 2))  # [B, T, r]
        delta = torch.bmm(low, self.lora_B[index].transpose(1, 2))  # [B, T, out]
        delta = delta * self.scaling[index].view(-1, 1, 1)
        return y + delta.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={self.lora_A.shape[0] - 1}, max_rank={self.lora_A.shape[1]}")


class AdapterSet:
    """The adapters installed on a model, by name; index 0 is the base."""

    def __init__(self, names: Sequence[str], rows: _Rows, device: torch.device):
        self.names = tuple(names)
        self._index = {name: i + 1 for i, name in enumerate(self.names)}
        self._rows = rows
        self._device = device

    def index(self, name: str | None) -> int:
        """The adapter index of `name` (None: the base); KeyError for an unknown name."""
        if name is None:
            return BASE
        if name not in self._index:
            raise KeyError(f"unknown adapter {str(name)[:80]!r}; installed: {', '.join(self.names) or 'none'}")
        return self._index[name]

    @contextlib.contextmanager
    def rows(self, indices: Sequence[int]) -> Iterator[None]:
        """While inside, batch row b of every forward uses adapter indices[b]. Rows that are
        all the base skip the adapters entirely (the base model's own computation)."""
        if any(i != BASE for i in indices):
            self._rows.index = torch.tensor(list(indices), dtype=torch.long, device=self._device)
        try:
            yield
        finally:
            self._rows.index = None


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def served_adapters(model: nn.Module) -> AdapterSet | None:
    """The AdapterSet `install_adapters` put on `model`, or None (a plain model)."""
    adapters = getattr(model, "served_adapters", None)
    return adapters if isinstance(adapters, AdapterSet) else None


def expected_shapes(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} an adapter with `cfg`'s targets and rank must hold for `model`:
    lora_A [rank, in] and lora_B [out, rank] for each target of every layer."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        m = _MODULE.match(name)
        if m is None or m.group(3) not in cfg.target_modules:
            continue
        shapes[f"{name}.lora_A"] = (cfg.rank, module.in_features)
        shapes[f"{name}.lora_B"] = (module.out_features, cfg.rank)
    return shapes


def install_adapters(model: nn.Module, adapters: Sequence[ServedAdapter]) -> AdapterSet:
    """Wrap every projection some adapter targets in a MultiLoRALinear holding all of them
    (adapter k + 1 is adapters[k]) and return the AdapterSet, also kept on the model as
    `served_adapters`. Each adapter's tensors must be exactly `expected_shapes(model, its
    config)` (checked by the caller: bastion/adapters/serving.py); they are copied, in the
    model's dtype, onto its device."""
    if not adapters:
        raise ValueError("install_adapters needs at least one adapter")
    if served_adapters(model) is not None or multi_lora_modules(model):
        raise ValueError("the model already has adapters installed")
    targets = {t for a in adapters for t in a.config.target_modules}
    rank = max(a.config.rank for a in adapters)
    rows = _Rows()
    weight = model.tok_embeddings.weight  # the compute dtype (a quantized weight's is not)
    for name, module in list(model.named_modules()):
        m = _MODULE.match(name)
        if m is None or m.group(3) not in targets:
            continue
        wrapped = MultiLoRALinear(module, len(adapters), rank, rows, dtype=weight.dtype, device=weight.device)
        setattr(model.get_submodule(name.rpartition(".")[0]), m.group(3), wrapped)
    layers = multi_lora_modules(model)
    for slot, adapter in enumerate(adapters, start=1):
        scaling = adapter.config.alpha / adapter.config.rank
        for tensor_name, lora_A in adapter.tensors.items():
            if tensor_name.endswith(".lora_A"):
                module = tensor_name.removesuffix(".lora_A")
                layers[module].set_adapter(slot, lora_A, adapter.tensors[f"{module}.lora_B"], scaling)
    adapter_set = AdapterSet([a.name for a in adapters], rows, weight.device)
    model.served_adapters = adapter_set
    return adapter_set


__all__ = ["BASE", "AdapterSet", "MultiLoRALinear", "ServedAdapter", "expected_shapes", "install_adapters",
           "multi_lora_modules", "served_adapters"]
