"""Strict validation of safetensors files before any tensor is built from them.

The layout checks (header size, offsets, overlaps, gaps, duplicate keys: what the safetensors
library's audit found missing or lenient, Trail of Bits 2023) live in
`bastion/safetensors_layout.py`, below every package that reads safetensors; this adds,
against a model, names, shapes and dtypes that match what the config says, optionally no
NaN/Inf.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bastion.errors import CheckpointError
from bastion.safetensors_layout import ITEM_SIZE, MAX_ELEMENTS, MAX_HEADER_BYTES, MAX_RANK, parse_header

TORCH_DTYPE = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or Inf (a corrupted or diverged checkpoint). A sum is
    finite only if every term is (NaN and Inf propagate, finite terms can only overflow), so
    one reduction settles a tensor; the element-wise test runs only when the sum is not
    finite (docs/benchmarks.md: 0.02-0.1 s instead of 0.5-1.9 s for the `base` preset, which
    exports and inference always check)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
            continue
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {name!r} contains NaN or Inf")


def check_against_model(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str | Path, *,
                        exact_dtype: bool = True) -> None:
    """Names, shapes and dtypes of checkpoint tensors must be exactly what the model has
    (with exact_dtype=False any floating-point dtype is accepted: it is copied in)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name in sorted(set(expected) & set(tensors)):
        want, got = expected[name], tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(got.shape)}, the config implies {tuple(want.shape)}")
        elif exact_dtype and got.dtype != want.dtype:
            problems.append(f"{name} has dtype {got.dtype}, the model uses {want.dtype}")
        elif not exact_dtype and not got.is_floating_point():
            problems.append(f"{name} has dtype {got.dtype}, not a floating-point type")
    if problems:
        raise CheckpointError(f"{where} does not match the model config: " + "; ".join(problems[:8]))


__all__ = ["ITEM_SIZE", "MAX_ELEMENTS", "MAX_HEADER_BYTES", "MAX_RANK", "TORCH_DTYPE", "check_against_model",
           "check_finite", "parse_header"]
