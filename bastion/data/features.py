"""Modality feature files: per-example [frames, features] tensors of named streams (audio,
visual, ...) for the sequence-level objectives (docs/multimodal.md, issue 17 part 2).

Layout: one safetensors file per split and modality, beside the split's JSONL file,

    data/train.jsonl                  {"id": "clip_0001", "text": "...", "label": "pos"}
    data/train.audio.safetensors      "clip_0001": F32 [frames, 74], "clip_0002": ...
    data/train.visual.safetensors     "clip_0001": F32 [frames, 35], ...

each tensor named by its example's id. Why this layout: one file per split and modality is a
handful of files however many examples (no directory of 10^5 tiny files to confine and
open), a feature extractor writes it with one `safetensors.torch.save_file(dict)`, and a
whole stream is checked in one pass of one header. An example whose id a file does not hold
simply lacks that modality (masked, allowed); a tensor whose id no example has is an error
(a misspelt id would otherwise silently train as a missing modality).

Reading is strict and happens before any tensor is built: the path confined to
data.allowed_roots and opened without following a symlink, the size bounded
(finetune.sequence.max_feature_file_bytes), the header's layout validated as a
checkpoint's is (bastion/safetensors_layout.py) (truncated file, overlapping or stray bytes, oversized header), then
every entry: an id of 1-128 printable characters, dtype F32 / F16 / BF16, rank 2, width ==
the modality's declared `features`, 1 <= frames <= its `max_frames`. Only then are tensors
built (safetensors, no pickle), and each is refused if it holds NaN or Inf. Every error is
one DataError naming the file, the modality and the example id; nothing is kept from a
file that fails.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from bastion.errors import DataError
from bastion.safeio import read_regular
from bastion.safepath import Roots
from bastion.safetensors_layout import parse_header

FEATURE_DTYPES = {"F32", "F16", "BF16"}  # float features only: no integer codes, no float64 doubling memory
MAX_ID_CHARS = 128
SUFFIX = ".safetensors"
STREAM_KEY = "streams"  # a batch's modality tensors: streams.<name>.frames / .frame_mask / .present


def feature_file_path(split_file: str | os.PathLike[str], modality: str) -> Path:
    """Where a split's modality lives: train.jsonl -> train.audio.safetensors (same folder)."""
    path = Path(split_file)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.{modality}{SUFFIX}")


def check_example_id(value: Any) -> str:
    """An example id: a string of 1 to MAX_ID_CHARS printable characters."""
    if not isinstance(value, str):
        raise DataError(f"'id' must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise DataError(f"'id' {value[:40]!r} must be 1 to {MAX_ID_CHARS} printable characters")
    return value


def _check_entry(name: str, info: dict[str, Any], modality: str, features: int, max_frames: int) -> str | None:
    """What is wrong with one header entry against the modality's declaration, or None."""
    try:
        check_example_id(name)
    except DataError as exc:
        return f"tensor name is not an example id: {exc}"
    dtype, shape = info["dtype"], info["shape"]
    if dtype not in FEATURE_DTYPES:
        return f"dtype {dtype} is not a float feature type (F32, F16 or BF16)"
    if len(shape) != 2:
        return f"shape {shape} is not [frames, features]"
    frames, width = shape
    if width != features:
        return f"has {width} features per frame, finetune.sequence.modalities.{modality}.features declares {features}"
    if frames < 1:
        return "has no frames (leave the example out of the file to mark the modality missing)"
    if frames > max_frames:
        return f"has {frames} frames, over finetune.sequence.modalities.{modality}.max_frames = {max_frames}"
    return None


def read_feature_file(path: str | os.PathLike[str], modality: str, features: int, max_frames: int,
                      roots: Roots | Collection[str], *, max_bytes: int,
                      ids: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """{example id: float32 [frames, features]} of one modality's feature file, every check of
    the module docstring passed; `ids` (the split's example ids), when given, must hold every
    tensor name."""
    what = f"feature file of modality {modality!r}"
    p = Roots(roots).confine(path, what, must_exist=True)
    data = read_regular(p, max_bytes, DataError)
    if len(data) > max_bytes:
        raise DataError(f"{p}: {what} is over finetune.sequence.max_feature_file_bytes = {max_bytes}")
    try:
        header, _ = parse_header(data, p, error=DataError)
    except DataError as exc:  # truncated, stray bytes, bad JSON: the layout check's own words
        raise DataError(f"{what}: {exc} (not a complete safetensors file)") from None
    for name in sorted(header):
        problem = _check_entry(name, header[name], modality, features, max_frames)
        if problem is None and ids is not None and name not in ids:
            problem = "names no example of the split (a misspelt id would train as a missing modality)"
        if problem:
            raise DataError(f"{p}: example {name[:80]!r}, modality {modality!r}: {problem}")
    tensors = load_safetensors(bytes(data)) if header else {}
    out = {}
    for name in sorted(tensors):
        values = tensors[name].float()
        if not torch.isfinite(values).all():
            raise DataError(f"{p}: example {name[:80]!r}, modality {modality!r}: contains NaN or Inf")
        out[name] = values
    return out


def pad_frames(examples: Sequence[torch.Tensor | None], features: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """One modality of a batch from per-example [frames, features] tensors (None: missing):
    {prefix+"frames": [B, F, features] zero-padded to the longest, prefix+"frame_mask": [B, F]
    (True: a real frame), prefix+"present": [B]} (model/fusion.py FrameBatch reads them)."""
    longest = max([len(x) for x in examples if x is not None], default=1)
    frames = torch.zeros(len(examples), longest, features)
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for row, x in enumerate(examples):
        if x is not None:
            frames[row, : len(x)] = x
            mask[row, : len(x)] = True
    present = torch.tensor([x is not None for x in examples], dtype=torch.bool)
    return {prefix + "frames": frames, prefix + "frame_mask": mask, prefix + "present": present}


def read_split_features(split_file: str | os.PathLike[str], modalities: Mapping[str, Any],
                        roots: Roots | Collection[str], *, max_bytes: int,
                        ids: Collection[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{modality: {example id: [frames, features]}} of every declared modality of a split
    (`modalities` is finetune.sequence.modalities). A declared modality without a file is an
    error: a whole stream missing is a mistake, not a masked example."""
    return {name: read_feature_file(feature_file_path(split_file, name), name, spec.features, spec.max_frames, roots,
                                    max_bytes=max_bytes, ids=ids)
            for name, spec in modalities.items()}


__all__ = ["FEATURE_DTYPES", "STREAM_KEY", "check_example_id", "feature_file_path", "pad_frames", "read_feature_file",
           "read_split_features"]
