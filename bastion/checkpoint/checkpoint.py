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

Every tensor's bytes are stored once. The safetensors format has no notion of two names
for one tensor (the library's `save_file` refuses shared storage, its `save_model` drops all
but one name), so the extra names live in the file's `__metadata__` (or, for a sharded
model, in model.safetensors.index.json beside `weight_map`), each a JSON object
{extra name: stored name}:
    aliases   shared storage at save (tied embeddings): loads as the very same tensor
    copies    equal bits, separate storage at save (a tied model cast to bf16 tensor by
              tensor): loads as a copy, so equal tensors that were never tied stay apart
Any safetensors reader sees the stored tensors; `load_checkpoint` restores the rest and
refuses an entry naming a tensor the file does not store. Older checkpoints, with the tie
stored twice, carry neither key and load as they are.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import safetensors.torch
import torch
from safetensors import SafetensorError

from bastion.checkpoint.formats import (
    MAX_JSON_BYTES,
    MODEL_FILE,
    MODEL_INDEX,
    SHARD_FILE,
    check_file,
    check_format,
    check_names,
    verify_contents,
)
from bastion.checkpoint.manifest import (
    MANIFEST,
    PICKLE_SUFFIXES,
    build_manifest,
    manifest_bytes,
    read_manifest,
    read_manifest_bytes,
    verify_directory,
)
from bastion.checkpoint.safetensors_check import TORCH_DTYPE, check_against_model, check_finite, parse_header
from bastion.checkpoint.signing import SIGNATURE, check_signature, sign_manifest
from bastion.errors import CheckpointError
from bastion.safeio import fsync_dir, make_private_dir, open_private, parse_json, read_regular, replace_file, write_bytes

LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted: never listed, removed by the next prune
MAX_LATEST_BYTES = 256
ALIASES, COPIES = "aliases", "copies"  # safetensors metadata / shard index keys of stored-once tensors


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


TensorFile = tuple[dict[str, torch.Tensor], dict[str, str]]  # tensors, safetensors metadata


def _serialize(ckpt: Checkpoint, max_shard_bytes: int | None) -> Iterator[tuple[str, bytes | TensorFile]]:
    """The checkpoint's files, one at a time: small ones as bytes, tensor files as tensors
    to stream (see write_safetensors)."""
    yield from _model_files(ckpt.model, max_shard_bytes)
    yield "trainer_state.json", json.dumps(ckpt.trainer_state, indent=2, sort_keys=True).encode()
    yield "config.yaml", ckpt.config_yaml.encode()
    yield "tokenizer.json", ckpt.tokenizer_json.encode()
    if ckpt.optimizer is not None:
        yield "optimizer.safetensors", _tensor_file(ckpt.optimizer, ckpt.optimizer_meta)
    if ckpt.rng:
        yield "rng.safetensors", _tensor_file(ckpt.rng)


def _split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Each tensor's bytes are stored once. Returns (stored tensors, aliases, copies):
    aliases ({name: stored name}) share storage with a stored tensor (tied embeddings) and
    load as that very tensor; copies hold the same bits as a stored tensor without sharing
    its storage (a tied model cast with `.to(dtype)`, which unties it) and load as their own
    copy, so tensors that merely happen to be equal (zero-initialised ones) never become tied.
    Nothing is copied here (the writer moves one tensor at a time to the CPU)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)
        if key in seen and tensor.numel() and tensor.device.type != "meta":
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor
    copies = _equal_tensors(unique)
    return {name: t for name, t in unique.items() if name not in copies}, aliases, copies


SAMPLE_ELEMENTS = 64  # compared first: distinct tensors of one shape almost always differ here
MIN_COPY_BYTES = 4096  # smaller equal tensors (norm weights at init) are stored as they are


def _equal_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: earlier name} for tensors (of MIN_COPY_BYTES or more) bit-for-bit equal to an
    earlier one of the same dtype and shape. A few elements are compared first, so a save of distinct tensors pays a
    negligible cost; only candidates that agree there are compared in full (on their device)."""
    groups: dict[tuple, list[tuple[str, bytes]]] = {}
    copies: dict[str, str] = {}
    for name, tensor in tensors.items():
        if tensor.numel() * tensor.element_size() < MIN_COPY_BYTES or tensor.device.type == "meta":
            continue
        sample = _bits(tensor.reshape(-1)[:SAMPLE_ELEMENTS]).cpu().numpy().tobytes()
        group = groups.setdefault((tensor.dtype, tuple(tensor.shape), tensor.device), [])
        for earlier, earlier_sample in group:
            if earlier_sample == sample and torch.equal(_bits(tensors[earlier]), _bits(tensor)):
                copies[name] = earlier
                break
        else:
            group.append((name, sample))
    return copies


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 tensor (NaN payloads and -0.0 compared as bits)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _tensor_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> TensorFile:
    unique, aliases, copies = _split_aliases(tensors)
    meta = dict(metadata or {})
    for key in (ALIASES, COPIES):
        if key in meta:
            raise CheckpointError(f"safetensors metadata key {key!r} is reserved for stored-once tensors")
    if aliases:
        meta[ALIASES] = json.dumps(aliases, sort_keys=True)
    if copies:
        meta[COPIES] = json.dumps(copies, sort_keys=True)
    return unique, meta


SAFETENSORS_DTYPE = {dtype: name for name, dtype in TORCH_DTYPE.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[int, str]:
    """Write a safetensors file at `path` (new, owner-only, fsynced) tensor by tensor: each
    is copied to the CPU on its own, so a save never holds a second copy of the whole state
    (nor, from a GPU, a first one). Returns the (size, SHA-256) of the bytes written.

    Layout as the safetensors library writes it: 8-byte little-endian header length, JSON
    header padded with spaces to 8 bytes, then the tensors back to back, wider dtypes first
    (so every tensor starts at a multiple of its item size), then by name."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPE:
            raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {tensor.dtype}, which checkpoints do not store")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open_private(path) as fh:
        for piece in (len(head).to_bytes(8, "little"), head):
            fh.write(piece)
            digest.update(piece)
        for name in order:
            raw = tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(raw.data)
            digest.update(raw.data)
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(head) + offset, digest.hexdigest()


def _model_files(model: dict[str, torch.Tensor], max_shard_bytes: int | None) -> Iterator[tuple[str, bytes | TensorFile]]:
    """model.safetensors, or above max_shard_bytes Hugging Face-style shards
    model-00001-of-0000N.safetensors plus model.safetensors.index.json (weight map, aliases)."""
    unique, aliases, copies = _split_aliases(model)
    total = sum(t.numel() * t.element_size() for t in unique.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        yield MODEL_FILE, _tensor_file(model)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in unique.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        yield fname, (shard, {})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map, ALIASES: aliases, COPIES: copies}
    yield MODEL_INDEX, json.dumps(index, indent=2, sort_keys=True).encode()


def save_checkpoint(root: str | Path, step: int, ckpt: Checkpoint, keep_last: int | None = None,
                    *, retention: "Retention | None" = None, max_shard_bytes: int | None = None,
                    signing_key: str | Path | None = None) -> Path:
    """Write `ckpt` as root/step_XXXXXXXX atomically, point `latest` at it, apply retention
    (keep_last alone, or a full Retention policy) only after the new one is committed.
    With `signing_key` its signature is written before the commit (bastion/checkpoint/signing.py)."""
    root = Path(root)
    make_private_dir(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    files: dict[str, bytes | tuple[int, str]] = {}
    try:
        for name, content in _serialize(ckpt, max_shard_bytes):
            if isinstance(content, bytes):
                write_bytes(tmp / name, content)
                files[name] = content
            else:
                files[name] = write_safetensors(tmp / name, *content)
        manifest_raw = manifest_bytes(build_manifest(files))
        write_bytes(tmp / MANIFEST, manifest_raw)
        if signing_key is not None:
            write_bytes(tmp / SIGNATURE, sign_manifest(manifest_raw, signing_key, final.name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never committed; earlier checkpoints untouched
        raise
    fsync_dir(tmp)
    if final.exists():
        # Re-saving a step: swap atomically. If we die between the two renames, `latest`
        # dangles for a moment; resolve_checkpoint then falls back to the newest committed dir.
        trash = _trash_path(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    replace_file(root / LATEST, (final.name + "\n").encode())
    if retention is None and keep_last is not None:
        retention = Retention(keep_last=keep_last)
    if retention is not None:
        prune(root, retention)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=_step_of)


@dataclass(frozen=True)
class Retention:
    """Which checkpoints survive pruning: the newest `keep_last`, the `keep_best` with the
    lowest validation loss (trainer_state "val_loss"), and every step divisible by
    `keep_every`. The checkpoint `latest` names is always kept."""

    keep_last: int = 3
    keep_best: int = 0
    keep_every: int | None = None


def _val_loss(path: Path) -> float:
    """A checkpoint's recorded validation loss; inf when it has none or cannot be read (such
    a checkpoint is never kept for being the best)."""
    try:
        data = read_checkpoint_file(path, "trainer_state.json", MAX_JSON_BYTES)
        value = parse_json(data or b"{}", CheckpointError, str(path)).get("val_loss")
        return float(value) if value is not None else math.inf
    except (CheckpointError, OSError, ValueError, AttributeError, TypeError):
        return math.inf


def to_prune(root: str | Path, policy: Retention | int) -> list[Path]:
    """The committed checkpoints `policy` does not keep (the one `latest` names is always kept)."""
    root = Path(root)
    policy = Retention(keep_last=policy) if isinstance(policy, int) else policy
    found = list_checkpoints(root)
    keep = {p.name for p in found[-policy.keep_last:]} if policy.keep_last else set()
    if policy.keep_best:
        keep |= {p.name for p in sorted(found, key=_val_loss)[: policy.keep_best] if _val_loss(p) < math.inf}
    if policy.keep_every:
        keep |= {p.name for p in found if _step_of(p) % policy.keep_every == 0}
    latest = _read_latest(root)
    if latest:
        keep.add(latest)
    return [p for p in found if p.name not in keep]


def prune(root: str | Path, policy: Retention | int) -> list[Path]:
    """Delete what `to_prune` lists, and leftovers of crashed saves and prunes. Each is first
    renamed out of the way (one atomic step, after which no listing shows it), then
    deleted: a prune killed midway never leaves a half-deleted folder that looks committed."""
    root = Path(root)
    removed = to_prune(root, policy)
    for path in removed:
        trash = _trash_path(path)
        if trash.exists():  # a recycled pid's leftover
            shutil.rmtree(trash)
        os.replace(path, trash)
    if removed:
        fsync_dir(root)  # the renames reach the disk before any deletion does
    for stale in [*root.glob(".tmp-step_*"), *root.glob(f"{TRASH_PREFIX}step_*")]:  # never visible as checkpoints
        shutil.rmtree(stale, ignore_errors=True)
    return removed


def _trash_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{TRASH_PREFIX}{checkpoint.name}-{os.getpid()}")


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _read_latest(root: Path) -> str | None:
    """The step folder `latest` names: only a real child folder of `root` (never reached
    through a link), from a pointer that is itself a small regular file."""
    try:
        raw = read_regular(root / LATEST, MAX_LATEST_BYTES, CheckpointError)
    except CheckpointError:  # missing, a link, a FIFO...
        return None
    name = raw.decode("utf-8", errors="replace").strip()
    target = root / name
    real = STEP_DIR.match(name) and target.is_dir() and not target.is_symlink()
    return name if real and len(raw) <= MAX_LATEST_BYTES else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a root holding `latest`, or a run dir with checkpoints/."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES and path.is_file():
        raise CheckpointError(
            f"{path}: pickle-format checkpoints ({path.suffix}) can execute arbitrary code when loaded and are "
            "refused. Convert it with `bastion ckpt convert --allow-pickle` (restricted, scanned load) first."
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if STEP_DIR.match(path.name) and path.is_symlink():
        raise CheckpointError(f"{path}: a symbolic link; checkpoint folders are never links (pass the folder it "
                              "points to if you trust it)")
    if (path / MANIFEST).exists():
        return path
    runs = path / "checkpoints"
    for root in [path] if runs.is_symlink() else [path, runs]:  # a linked checkpoints/ could lead anywhere
        name = _read_latest(root)
        if name:
            return root / name
        committed = list_checkpoints(root)
        if committed:
            # `latest` is missing or dangles (a crash between two renames): directories only
            # appear by atomic rename, so the newest one is complete.
            return committed[-1]
    raise CheckpointError(f"{path}: neither a checkpoint (no {MANIFEST}) nor a folder with a '{LATEST}' pointer")


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest (every file's size, SHA-256 and
    format, no extra files, no links); returns the manifest. Raises CheckpointError naming
    the file."""
    return verified_headers(path)[1]


def verified_headers(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, dict]]:
    """`verify_checkpoint`, returning the checkpoint's directory, its manifest and the
    validated header of each safetensors file (read in the same pass: no tensor is built)."""
    directory = resolve_checkpoint(path)
    manifest, manifest_raw = read_manifest_bytes(directory)
    check_signature(directory, manifest_raw)
    return directory, manifest, verify_contents(directory, manifest)


def read_listed(directory: Path, listed: dict[str, Any], name: str, *, verify: bool = True,
                max_bytes: int | None = None) -> bytes:
    """The bytes of `name`, a file the manifest `listed` names: never through a symlink,
    never more bytes than the manifest declares, of the format its name says, and (with
    verify) the SHA-256 checked on exactly the bytes returned, so what was hashed is what
    gets parsed."""
    if name not in listed:
        raise CheckpointError(f"{directory}: {name} is missing from the manifest")
    size = listed[name]["size"]
    path = directory / name
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{path}: {size} bytes, over the limit of {max_bytes}")
    data = read_regular(path, size, CheckpointError)
    if len(data) != size:
        raise CheckpointError(f"{path}: size does not match manifest ({size})")
    if verify and hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match manifest (file modified or corrupt)")
    check_format(path, data)
    return data


def read_checkpoint_file(directory: Path, name: str, max_bytes: int) -> bytes | None:
    """One file of a checkpoint (or adapter) folder, verified against its manifest; None if
    the manifest does not list it. For the small files a command needs alone."""
    listed = read_manifest(directory)["files"]
    return read_listed(directory, listed, name, max_bytes=max_bytes) if name in listed else None


def load_checkpoint(path: str | Path, verify: bool = True, load_optimizer: bool = True, *,
                    expect: dict[str, torch.Tensor] | None = None, reject_nonfinite: bool = False) -> Checkpoint:
    """Load a checkpoint. With verify (the default) every file's size and SHA-256 must match
    the manifest, and nothing unlisted may sit beside them; each file is read once, and the
    bytes that were hashed are the bytes that get parsed. Every safetensors header is
    validated before tensors are built. `expect` (e.g. a meta-device model's state_dict)
    makes names, shapes and dtypes of the weights must-match; `reject_nonfinite` refuses
    NaN/Inf weights. Files not needed (the optimizer state, unless load_optimizer) are
    verified too, streaming: with verify, a modified file is always an error."""
    directory = resolve_checkpoint(path)
    manifest, manifest_raw = read_manifest_bytes(directory)
    check_signature(directory, manifest_raw, hashes_checked=verify)
    listed = manifest["files"]
    if verify:
        verify_directory(directory, manifest, hash_files=False)
        check_names(directory, listed)
    unread = set(listed)

    def read(name: str) -> bytes:
        unread.discard(name)
        return read_listed(directory, listed, name, verify=verify)

    model = _load_model(directory, listed, read)
    if expect is not None:
        check_against_model(model, expect, directory / MODEL_FILE)
    if reject_nonfinite:
        check_finite(model, directory)
    optimizer, optimizer_meta = None, {}
    if load_optimizer and "optimizer.safetensors" in listed:
        optimizer, optimizer_meta = _load_tensors(directory / "optimizer.safetensors", read("optimizer.safetensors"))
    rng = _load_tensors(directory / "rng.safetensors", read("rng.safetensors"))[0] if "rng.safetensors" in listed else {}
    trainer_state = parse_json(read("trainer_state.json"), CheckpointError, f"{directory / 'trainer_state.json'}")
    config_yaml, tokenizer_json = read("config.yaml").decode("utf-8"), read("tokenizer.json").decode("utf-8")  # UTF-8: read checked it
    if verify:  # what this load does not need is verified too: a modified file is always an error
        for name in sorted(unread):
            check_file(directory / name, listed[name])
    return Checkpoint(
        model=model,
        trainer_state=trainer_state,
        config_yaml=config_yaml,
        tokenizer_json=tokenizer_json,
        optimizer=optimizer,
        optimizer_meta=optimizer_meta,
        rng=rng,
        directory=directory,
    )


def _load_model(directory: Path, listed: dict, read) -> dict[str, torch.Tensor]:
    if MODEL_INDEX not in listed:
        return _load_tensors(directory / MODEL_FILE, read(MODEL_FILE))[0]
    where = directory / MODEL_INDEX
    index = parse_json(read(MODEL_INDEX), CheckpointError, f"{where}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{where}: malformed shard index")
    shard_names = sorted(set(weight_map.values()))
    for name in shard_names:
        if not SHARD_FILE.match(name) or name not in listed:
            raise CheckpointError(f"{where}: names an invalid or unlisted shard {str(name)[:80]!r}")
    model: dict[str, torch.Tensor] = {}
    for name in shard_names:
        tensors, _ = _load_tensors(directory / name, read(name))
        for key in tensors:
            if weight_map.get(key) != name:
                raise CheckpointError(f"{directory / name}: holds {key!r}, which the index places elsewhere")
        model.update(tensors)
    if set(model) != set(weight_map):
        raise CheckpointError(f"{where}: tensors listed in the index are missing from the shards")
    return _restore_shared(model, index.get(ALIASES), index.get(COPIES), where)


def _load_tensors(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the layout strictly (parse_header), build the tensors, restore the tensors
    stored once; returns the remaining metadata too."""
    _, metadata = parse_header(data, path)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    aliases, copies = (_parse_json_map(metadata.pop(key, None), key, path) for key in (ALIASES, COPIES))
    return _restore_shared(tensors, aliases, copies, path), metadata


def _parse_json_map(raw: str | None, key: str, where: Path) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{where}: {key!r} metadata is not JSON") from None


def _restore_shared(tensors: dict[str, torch.Tensor], aliases: Any, copies: Any, where: Path) -> dict[str, torch.Tensor]:
    """Add the tensors stored once under another name: aliases as that same tensor (the tie
    restored), copies as a copy. Hostile input: every entry must name a tensor that is
    stored (not another alias, not itself), and no alias may replace a stored tensor."""
    stored = set(tensors)
    for key, entries in ((ALIASES, aliases), (COPIES, copies)):
        if entries is None:
            continue
        if not isinstance(entries, dict) or len(entries) > len(stored):
            raise CheckpointError(f"{where}: malformed {key!r} (a JSON object naming at most one entry per stored tensor)")
        for name, target in entries.items():
            if not isinstance(target, str) or target not in stored:
                raise CheckpointError(f"{where}: {key} entry {str(name)[:80]!r} names {str(target)[:80]!r}, "
                                      "which is not a tensor stored in the file")
            if name in tensors:
                raise CheckpointError(f"{where}: {key} entry {name[:80]!r} names a tensor that is already stored")
            tensors[name] = tensors[target] if key == ALIASES else tensors[target].clone()
    return tensors
