"""The layout of a safetensors file, validated before any tensor is built from it (the
checks the safetensors audit found missing or lenient, Trail of Bits 2023): a bounded header
size, every offset inside the data section, offsets matching dtype x shape, no overlapping
tensors, no gaps or trailing bytes, no duplicate keys, metadata of strings only.

Below every package that reads safetensors: checkpoints (`checkpoint/safetensors_check.py`
adds the checks against a model), Hugging Face folders, and modality feature files
(`data/features.py`). `error` picks the exception a caller's users expect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.errors import CheckpointError
from bastion.safeio import parse_json

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference limit
# Caps on what a header may declare, checked before any tensor is built from it. A tensor
# with a zero dimension spans no bytes, so the byte count alone does not bound its other
# dimensions: without these, [2**63, 0] overflows torch's int64 sizes (TypeError with C++
# frames) and [2**40, 2**40, 0] the safetensors library's arithmetic.
MAX_RANK = 8  # real weights have at most 5 dimensions (3-D convolutions)
MAX_ELEMENTS = 2**40  # per tensor, zero dimensions left out: ~250x the largest embedding in use
ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
def _no_duplicates(pairs: list[tuple[str, Any]], error: type[Exception] = CheckpointError) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise error(f"duplicate key {dup!r} in safetensors header")
    return dict(pairs)


def _checked_shape(shape: Any, tensor: str, where: str | Path, error: type[Exception] = CheckpointError) -> int:
    """The element count of a declared shape: a list of at most MAX_RANK non-negative ints
    whose non-zero ones multiply to at most MAX_ELEMENTS (checked factor by factor)."""
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise error(f"{where}: {tensor} has an invalid shape {str(shape)[:80]}")
    elements = 1
    for dim in shape:
        elements *= dim or 1
        if elements > MAX_ELEMENTS:
            raise error(f"{where}: {tensor} declares a shape {str(shape)[:80]} over the "
                                  f"{MAX_ELEMENTS}-element limit")
    return 0 if 0 in shape else elements


def parse_header(data: bytes | memoryview, where: str | Path = "<bytes>", *, size: int | None = None,
                 error: type[Exception] = CheckpointError) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the layout of a safetensors file: `data` is the whole file, or with `size`
    (the file's length) at least its first 8 + header-length bytes, as a reader streaming
    the file keeps them.

    Returns ({tensor name: {"dtype", "shape", "data_offsets"}}, metadata). Every problem is an
    `error` (CheckpointError unless told) naming `where` and what is wrong.
    """
    total = len(data) if size is None else size
    if total < 8:
        raise error(f"{where}: {total} bytes, too short for a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise error(f"{where}: header declares {header_len} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > total:
        raise error(f"{where}: header declares {header_len} bytes but the file has {total - 8} after the length")
    try:
        header = parse_json(bytes(data[8 : 8 + header_len]), error, "header",
                            object_pairs_hook=lambda pairs: _no_duplicates(pairs, error))
    except error as exc:
        raise error(f"{where}: {exc}") from None
    if not isinstance(header, dict):
        raise error(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{where}: __metadata__ must map strings to strings")

    data_len = total - 8 - header_len
    spans = []
    for name, info in header.items():
        tensor = f"tensor {name[:80]!r}"  # messages stay one short line, whatever the header holds
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(f"{where}: {tensor} entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEM_SIZE:
            raise error(f"{where}: {tensor} has unsupported dtype {str(dtype)[:40]!r}")
        elements = _checked_shape(shape, tensor, where, error)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise error(f"{where}: {tensor} has invalid data_offsets {str(offsets)[:80]}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise error(f"{where}: {tensor} offsets [{begin}, {end}] fall outside the {data_len}-byte data section")
        expected = elements * ITEM_SIZE[dtype]
        if end - begin != expected:
            raise error(f"{where}: {tensor} spans {end - begin} bytes but {dtype}{shape} needs {expected}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise error(f"{where}: tensor {name[:80]!r} overlaps the previous tensor (offset {begin} < {position})")
        if begin > position:
            raise error(f"{where}: {begin - position} unaccounted bytes before tensor {name[:80]!r}")
        position = end
    if position != data_len:
        raise error(f"{where}: {data_len - position} trailing bytes after the last tensor")
    return header, metadata


__all__ = ["ITEM_SIZE", "MAX_ELEMENTS", "MAX_HEADER_BYTES", "MAX_RANK", "parse_header"]
