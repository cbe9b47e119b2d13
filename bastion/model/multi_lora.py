"""Multi-LoRA inference: one base model, several LoRA adapters, chosen per batch row.

`install_adapters` wraps every projection that at least one adapter targets in a
`MultiLoRALinear`, which keeps the base layer as it is (unmerged, shared by every adapter;
a quantized or bf16 layer works the same) and holds all adapters side by side:

    lora_A   [(n + 1) * r, in]    adapter s's A is rows s*r .. s*r + r - 1; slot 0 is all
    lora_B   [out, (n + 1) * r]   zeros ("no adapter": the base); r = the largest rank, a
                                  smaller rank is zero-padded (adds exact zeros)

Before a forward, the caller says which adapter each batch row uses (`AdapterSet.rows`, a
context manager; the engine does it for every prefill and decode step), and each layer adds
its rows' deltas, alpha / rank of adapter i_b being s_b:

    y[b] = base(x)[b] + (x[b] @ A[i_b]^T @ B[i_b]^T) * s_b

  * one row (a prefill, a rowwise decode step): just that adapter's two matmuls, as
    LoRALinear computes them;
  * several rows (a batched decode step), while the adapters are not many more than the
    rows (GATHER_ABOVE): every adapter at once, `x @ lora_A^T` -> [B, T, (n + 1) * r],
    multiplied by a per-row mask that keeps only the row's own adapter's r columns (times
    s_b) and zeroes the others, then `@ lora_B^T`. Two plain matmuls over the shared
    stacks, no per-row copies;
  * several rows, many more adapters: each row's A and B gathered ([B, r, in], [B, out, r])
    and two batched matmuls (bmm), whose cost grows with the rows, not the adapters.

Batch invariance. Which path runs depends only on the batch size and the number of adapters,
which the engine's padded mode fixes (prefill: 1 row; decode: every slot), and a matmul's
kernel, so the summation order of a row, depends only on the shapes: a row's delta depends
on that row's input and adapter, whatever the other rows hold. A request's output is
bit-identical whether it runs alone or batched with requests for other adapters or the base
(tests/infer/test_multi_lora_engine.py).

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
import torch.nn.functional as F
from torch import nn

from bastion.config.schema import LoraConfig

BASE = 0  # the adapter index of rows that use the base alone
# Several rows: every adapter in one masked matmul while the stacks are at most this many
# times the rows, else each row's own adapter gathered (measured per decode step of 16
# rows: at 4 adapters masked 0.8-0.95x of the base's, gathered ~0.7x; equal near 32).
GATHER_ABOVE = 2
_MODULE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


@dataclass
class ServedAdapter:
    """One adapter to serve: its name, settings and lora_A / lora_B tensors (as in
    adapter.safetensors: "layers.0.attention.wq.lora_A", ...)."""

    name: str
    config: LoraConfig
    tensors: dict[str, torch.Tensor]


class _Rows:
    """The adapter of every batch row for the forward being run, shared by all the model's
    MultiLoRALinear layers. `index` None: every row is the base."""

    def __init__(self) -> None:
        self.index: list[int] | None = None
        self.scaling: list[float] = []  # one row: its adapter's alpha / rank
        self.mask: torch.Tensor | None = None  # several rows: [B, 1, (n + 1) * r], see MultiLoRALinear
        self.gather: tuple[torch.Tensor, torch.Tensor] | None = None  # many adapters: index [B], scaling [B, 1, 1]


class MultiLoRALinear(nn.Module):
    """A base layer plus n LoRA adapters side by side, one chosen per batch row (module docstring)."""

    def __init__(self, base: nn.Module, n_adapters: int, rank: int, rows: _Rows, *, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.slots = rank, n_adapters + 1
        self._rows = rows
        width = self.slots * rank
        self.register_buffer("lora_A", torch.zeros(width, self.in_features, dtype=dtype, device=device))
        self.register_buffer("lora_B", torch.zeros(self.out_features, width, dtype=dtype, device=device))

    def adapter(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `slot`'s (A [r, in], B [out, r]): views of the stacks."""
        columns = slice(slot * self.rank, (slot + 1) * self.rank)
        return self.lora_A[columns], self.lora_B[:, columns]

    @torch.no_grad()
    def set_adapter(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        A, B = self.adapter(slot)
        rank = lora_A.shape[0]
        A[:rank] = lora_A.to(A.dtype)
        B[:, :rank] = lora_B.to(B.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self._rows
        if rows.index is None:
            return y
        if len(rows.index) != x.shape[0]:
            raise ValueError(f"adapter rows: {len(rows.index)} indices for a batch of {x.shape[0]} rows")
        if x.shape[0] == 1:
            A, B = self.adapter(rows.index[0])
            return y + (F.linear(F.linear(x, A), B) * rows.scaling[0]).to(y.dtype)
        if rows.mask is not None:
            low = F.linear(x, self.lora_A)  # [B, T, (n + 1) * r]: every adapter's
            low = (low * rows.mask).to(x.dtype)  # the row's own adapter's columns only, scaled
            return y + F.linear(low, self.lora_B).to(y.dtype)
        return y + self._gathered_delta(x, rows).to(y.dtype)

    def _gathered_delta(self, x: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """Many adapters, few rows: each row's own A and B copied out, two batched matmuls."""
        index, scaling = rows.gather
        A = self.lora_A.view(self.slots, self.rank, self.in_features)[index]  # [B, r, in]
        B = self.lora_B.view(self.out_features, self.slots, self.rank).permute(1, 0, 2)[index]  # [B, out, r]
        low = torch.bmm(x.reshape(x.shape[0], -1, self.in_features), A.transpose(1, 2))  # [B, T, r]
        delta = torch.bmm(low, B.transpose(1, 2))  # [B, T, out]
        return (delta * scaling).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.slots - 1}, "
                f"max_rank={self.rank}")


class AdapterSet:
    """The adapters installed on a model, by name; index 0 is the base."""

    def __init__(self, names: Sequence[str], scaling: Sequence[float], rank: int, rows: _Rows,
                 layer: MultiLoRALinear):
        self.names = tuple(names)
        self._index = {name: i + 1 for i, name in enumerate(self.names)}
        self._scaling = [0.0, *scaling]  # per slot; slot 0 (the base) adds nothing
        self._rank = rank
        self._rows = rows
        self._layer = layer  # one of the model's: where its buffers are now (model.to() replaces them)

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
        rows = self._rows
        if any(i != BASE for i in indices):
            if not all(0 <= i < len(self._scaling) for i in indices):
                raise ValueError(f"adapter indices must be in [0, {len(self._scaling)}), got {list(indices)}")
            rows.index = list(indices)
            rows.scaling = [self._scaling[i] for i in indices]
            if len(indices) > 1 and len(self._scaling) <= GATHER_ABOVE * len(indices):
                rows.mask = self._mask(rows.index)
            elif len(indices) > 1:
                device = self._layer.lora_A.device
                rows.gather = (torch.tensor(rows.index, device=device),
                               torch.tensor(rows.scaling, device=device).view(-1, 1, 1))
        try:
            yield
        finally:
            rows.index, rows.scaling, rows.mask, rows.gather = None, [], None, None

    def _mask(self, indices: list[int]) -> torch.Tensor:
        """[B, 1, (n + 1) * r]: row b's alpha / rank on its adapter's r columns, 0 elsewhere.
        float32: alpha / rank is a Python float in LoRALinear too."""
        mask = torch.zeros(len(indices), len(self._scaling), self._rank)
        for b, i in enumerate(indices):
            mask[b, i] = self._scaling[i]
        return mask.view(len(indices), 1, -1).to(self._layer.lora_A.device)


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
        for tensor_name, lora_A in adapter.tensors.items():
            if tensor_name.endswith(".lora_A"):
                module = tensor_name.removesuffix(".lora_A")
                layers[module].set_adapter(slot, lora_A, adapter.tensors[f"{module}.lora_B"])
    scaling = [a.config.alpha / a.config.rank for a in adapters]
    adapter_set = AdapterSet([a.name for a in adapters], scaling, rank, rows, next(iter(layers.values())))
    model.served_adapters = adapter_set
    return adapter_set


__all__ = ["BASE", "GATHER_ABOVE", "AdapterSet", "MultiLoRALinear", "ServedAdapter", "expected_shapes",
           "install_adapters", "multi_lora_modules", "served_adapters"]
