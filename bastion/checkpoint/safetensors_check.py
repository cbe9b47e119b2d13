"""Strict validation of safetensors files before any tensor is built from them.

The safetensors library already refuses code execution; this adds the checks its audit
found missing or lenient (Trail of Bits, 2023): a bounded header size, every offset inside
the data section, offsets matching dtype x shape, no overlapping tensors, no gaps or trailing
bytes, no duplicate keys, metadata of strings only - and, against a model, names, shapes and
dtypes that match what the config says, optionally no NaN/Inf.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bastion.errors import CheckpointError
from bastion.safeio import parse_json

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference limit
ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
TORCH_DTYPE = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CheckpointError(f"duplicate key {dup!r} in safetensors header")
    return dict(pairs)


def parse_header(data: bytes | memoryview, where: str | Path = "<bytes>") -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the layout of a whole safetensors file held in memory.

    Returns ({tensor name: {"dtype", "shape", "data_offsets"}}, metadata). Every problem is a
    CheckpointError naming `where` and what is wrong.
    """
    total = len(data)
    if total < 8:
        raise CheckpointError(f"{where}: {total} bytes, too short for a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header declares {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > total:
        raise CheckpointError(f"{where}: header declares {header_len} bytes but the file has {total - 8} after the length")
    try:
        header = parse_json(bytes(data[8 : 8 + header_len]), CheckpointError, "header",
                            object_pairs_hook=_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")

    data_len = total - 8 - header_len
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: tensor {name!r} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEM_SIZE:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{where}: tensor {name!r} offsets [{begin}, {end}] fall outside the {data_len}-byte data section")
        expected = math.prod(shape) * ITEM_SIZE[dtype]
        if end - begin != expected:
            raise CheckpointError(f"{where}: tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise CheckpointError(f"{where}: tensor {name!r} overlaps the previous tensor (offset {begin} < {position})")
        if begin > position:
            raise CheckpointError(f"{where}: {begin - position} unaccounted bytes before tensor {name!r}")
        position = end
    if position != data_len:
        raise CheckpointError(f"{where}: {data_len - position} trailing bytes after the last tensor")
    return header, metadata


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse weights holding NaN or Inf (a corrupted or diverged checkpoint)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
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
