"""Save and load training checkpoints: safetensors + JSON only, verified, atomic.

Layout of one checkpoint (a directory `step_00000100`):
    model.safetensors      model weights
    optimizer.safetensors  optimizer state tensors; param groups as JSON in its metadata
    rng.safetensors        RNG states (so dropout continues identically after resume)
    trainer_state.json     step, data cursor, counters
    config.yaml            the run's config, secrets redacted
    tokenizer.json         the tokenizer the model was trained with
    MANIFEST.json          size + SHA-256 of each file above
Nothing is pickled. A checkpoint appears only by an atomic rename of a finished temporary
directory; `latest` (a small text file) is replaced atomically after that.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from bastion.checkpoint.manifest import (
    MANIFEST,
    PICKLE_SUFFIXES,
    build_manifest,
    manifest_bytes,
    read_manifest,
    verify_directory,
)
from bastion.errors import CheckpointError
from bastion.safeio import fsync_dir, make_private_dir, replace_file, write_bytes

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
MAX_JSON_BYTES = 64 * 2**20


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    trainer_state: dict[str, Any]
    config_yaml: str
    tokenizer_json: str
    optimizer: dict[str, torch.Tensor] | None = None
    optimizer_meta: dict[str, str] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    directory: Path | None = None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _serialize(ckpt: Checkpoint) -> dict[str, bytes]:
    files = {
        "model.safetensors": _save_tensors(ckpt.model),
        "trainer_state.json": json.dumps(ckpt.trainer_state, indent=2, sort_keys=True).encode(),
        "config.yaml": ckpt.config_yaml.encode(),
        "tokenizer.json": ckpt.tokenizer_json.encode(),
    }
    if ckpt.optimizer is not None:
        files["optimizer.safetensors"] = _save_tensors(ckpt.optimizer, ckpt.optimizer_meta)
    if ckpt.rng:
        files["rng.safetensors"] = _save_tensors(ckpt.rng)
    return files


def _save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes; tensors that alias another (tied embeddings) are stored once and
    recorded in the metadata key `aliases`, then restored by `_load_tensors`."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen and tensor.numel():
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor.contiguous()
    meta = dict(metadata or {})
    if aliases:
        meta["aliases"] = json.dumps(aliases, sort_keys=True)
    return safetensors.torch.save(unique, metadata=meta or None)


def save_checkpoint(root: str | Path, step: int, ckpt: Checkpoint, keep_last: int | None = None) -> Path:
    """Write `ckpt` as root/step_XXXXXXXX atomically, point `latest` at it, apply retention."""
    root = Path(root)
    make_private_dir(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    files = _serialize(ckpt)
    for name, data in files.items():
        write_bytes(tmp / name, data)
    write_bytes(tmp / MANIFEST, manifest_bytes(build_manifest(files)))
    fsync_dir(tmp)
    if final.exists():
        # Re-saving the same step (e.g. a signal right after a periodic save): swap atomically.
        trash = root / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    replace_file(root / LATEST, (final.name + "\n").encode())
    if keep_last is not None:
        prune(root, keep_last)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    root = Path(root)
    keep = {p.name for p in list_checkpoints(root)[-keep_last:]}
    latest = _read_latest(root)
    if latest:
        keep.add(latest)
    removed = []
    for path in list_checkpoints(root):
        if path.name not in keep:
            shutil.rmtree(path)
            removed.append(path)
    for stale in root.glob(".tmp-step_*"):  # left by a crashed save; never visible as a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def _read_latest(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file() or pointer.is_symlink():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    return name if STEP_DIR.match(name) else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a root holding `latest`, or a run dir with checkpoints/."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and path.is_file():
        raise CheckpointError(
            f"{path}: pickle-format checkpoints ({path.suffix}) can execute arbitrary code when loaded and are "
            "refused. Convert it to safetensors with a trusted tool first."
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        name = _read_latest(root)
        if name:
            target = root / name
            if not target.is_dir():
                raise CheckpointError(f"{root / LATEST} names {name}, which does not exist")
            return target
    raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}) nor a folder with a '{LATEST}' pointer")


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest (every file's size and SHA-256, no
    extra files, no links); returns the manifest. Raises CheckpointError naming the file."""
    directory = resolve_checkpoint(path)
    manifest = read_manifest(directory)
    verify_directory(directory, manifest, hash_files=True)
    return manifest


def load_checkpoint(path: str | Path, verify: bool = True, load_optimizer: bool = True) -> Checkpoint:
    """Load a checkpoint. With verify (the default) every file's size and SHA-256 must match
    the manifest, and nothing unlisted may sit beside them; each file is read once, and the
    bytes that were hashed are the bytes that get parsed."""
    directory = resolve_checkpoint(path)
    manifest = read_manifest(directory)
    if verify:
        verify_directory(directory, manifest, hash_files=False)
    listed = manifest["files"]

    def read(name: str, required: bool = True) -> bytes | None:
        if name not in listed:
            if required:
                raise CheckpointError(f"{directory}: {name} is missing from the manifest")
            return None
        data = (directory / name).read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise CheckpointError(f"{directory / name}: SHA-256 does not match manifest (file modified or corrupt)")
        return data

    model = _load_tensors(directory / "model.safetensors", read("model.safetensors"))
    optimizer, optimizer_meta = None, {}
    if load_optimizer and "optimizer.safetensors" in listed:
        data = read("optimizer.safetensors")
        optimizer = _load_tensors(directory / "optimizer.safetensors", data)
        optimizer_meta = _safetensors_metadata(directory / "optimizer.safetensors", data)
        optimizer_meta.pop("aliases", None)
    rng_bytes = read("rng.safetensors", required=False)
    rng = _load_tensors(directory / "rng.safetensors", rng_bytes) if rng_bytes else {}
    try:
        trainer_state = json.loads(read("trainer_state.json"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / 'trainer_state.json'}: invalid JSON ({exc})") from None
    return Checkpoint(
        model=model,
        trainer_state=trainer_state,
        config_yaml=read("config.yaml").decode("utf-8"),
        tokenizer_json=read("tokenizer.json").decode("utf-8"),
        optimizer=optimizer,
        optimizer_meta=optimizer_meta,
        rng=rng,
        directory=directory,
    )


def _load_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    aliases = _safetensors_metadata(path, data).get("aliases")
    if aliases:
        try:
            for name, target in json.loads(aliases).items():
                tensors[name] = tensors[target]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{path}: malformed 'aliases' metadata") from None
    return tensors


def _safetensors_metadata(path: Path, data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    return header.get("__metadata__", {}) or {}
