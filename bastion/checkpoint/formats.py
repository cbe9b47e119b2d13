"""What each file of a checkpoint must be, checked on the very bytes that are hashed.

A manifest pins every file's size and SHA-256, but whoever can rewrite a checkpoint can
rewrite its manifest too: a pickle saved as model.safetensors, with a manifest to match,
hashes fine. So a checkpoint is verified by format as well as by hash, file by file, by name:

    *.safetensors   the strict layout check (`safetensors_check.parse_header`): offsets,
                    dtypes, shapes within limits, no holes, no trailing bytes
    *.json          a JSON object, nesting bounded (`safeio.parse_json`), at most 64 MiB
    *.yaml          a YAML mapping or nothing, nesting and aliases bounded
                    (`config.load.parse_yaml`), at most 1 MiB

and a checkpoint folder holds only the files Bastion writes (`CHECKPOINT_FILES`, model
shards); anything else listed in its manifest is refused. `FileCheck` does all of it in the
one pass that hashes a file, keeping only what the format needs (a safetensors header, a
small file's text): a file is read once, and what is checked is what was hashed.
`verify_contents` applies it to a whole folder: `verify_checkpoint` (so `ckpt verify`,
`ckpt inspect`, pushes and pulls), every `load_checkpoint`, and `ckpt pack` / `unpack`.

What a file says beyond its format (a config's schema, a tokenizer's special tokens, weights
that fit the model) is checked by the reader that uses it (`contents.py`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from bastion.checkpoint.manifest import verify_directory
from bastion.checkpoint.safetensors_check import MAX_HEADER_BYTES, parse_header
from bastion.config.load import parse_yaml
from bastion.errors import CheckpointError, ConfigError
from bastion.safeio import open_regular, parse_json

MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
CHECKPOINT_FILES = frozenset({MODEL_FILE, MODEL_INDEX, "optimizer.safetensors", "rng.safetensors",
                              "trainer_state.json", "config.yaml", "tokenizer.json"})
MAX_JSON_BYTES = 64 * 2**20  # tokenizer.json of a 1M-token vocabulary is ~50 MiB
MAX_YAML_BYTES = 1 * 2**20
# Files read whole to check them, and at most how large: nothing larger is ever buffered.
BUFFERED = {".json": MAX_JSON_BYTES, ".yaml": MAX_YAML_BYTES}
SAFETENSORS = ".safetensors"
READ_BLOCK = 4 * 2**20


def _suffix(path: Path) -> str:
    suffix = path.suffix
    if suffix != SAFETENSORS and suffix not in BUFFERED:
        raise CheckpointError(f"{path}: not a file type a checkpoint holds (safetensors, JSON or YAML)")
    return suffix


def check_names(directory: Path, names: Any) -> None:
    """Refuse a checkpoint whose manifest lists a file Bastion never writes into one."""
    for name in names:
        if name not in CHECKPOINT_FILES and not SHARD_FILE.match(name):
            raise CheckpointError(f"{directory / name}: not a file a Bastion checkpoint holds "
                                  f"({', '.join(sorted(CHECKPOINT_FILES))} or model shards)")


def check_format(path: Path, data: bytes, *, size: int | None = None) -> dict[str, dict] | None:
    """Refuse `data` unless it is the format `path`'s name says; returns a safetensors file's
    tensor entries (None for the other kinds). `data` is the whole file, or for safetensors
    with `size` its first bytes up to the end of the header."""
    suffix = _suffix(path)
    if suffix == SAFETENSORS:
        return parse_header(data, path, size=size)[0]
    if len(data) > BUFFERED[suffix]:
        raise CheckpointError(f"{path}: {len(data)} bytes, over the {BUFFERED[suffix]}-byte limit")
    if suffix == ".json":
        if not isinstance(parse_json(data, CheckpointError, f"{path}"), dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return None
    try:
        value = parse_yaml(data.decode("utf-8"), f"{path}")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if value is not None and not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a YAML mapping")
    return None


class FileCheck:
    """Size, SHA-256 and format of one file its manifest lists, from its bytes in order: feed
    every block to `update`, then `finish` checks them all. Holds at most the safetensors
    header (bounded by MAX_HEADER_BYTES) or a JSON / YAML file (bounded by BUFFERED)."""

    def __init__(self, path: Path, entry: dict[str, Any]):
        self.path, self.size, self.sha256 = path, entry["size"], entry["sha256"]
        self.suffix = _suffix(path)
        if self.suffix in BUFFERED and self.size > BUFFERED[self.suffix]:
            raise CheckpointError(f"{path}: {self.size} bytes, over the {BUFFERED[self.suffix]}-byte limit")
        self.digest = hashlib.sha256()
        self.count = 0
        self.kept = bytearray()

    def _wanted(self) -> int:
        """How many leading bytes the format check needs (known once the length prefix is in)."""
        if self.suffix != SAFETENSORS:
            return self.size
        if len(self.kept) < 8:
            return 8
        return 8 + min(int.from_bytes(self.kept[:8], "little"), MAX_HEADER_BYTES)

    def update(self, block: bytes | memoryview) -> None:
        self.count += len(block)
        if self.count > self.size:
            raise CheckpointError(f"{self.path}: more than the {self.size} bytes its manifest lists")
        self.digest.update(block)
        taken = 0
        while taken < len(block) and len(self.kept) < (wanted := self._wanted()):
            piece = block[taken : taken + wanted - len(self.kept)]
            self.kept += piece
            taken += len(piece)

    def finish(self) -> dict[str, dict] | None:
        """Raise unless the bytes seen are the manifest's (size, SHA-256) and of the right
        format; returns what `check_format` does."""
        if self.count != self.size:
            raise CheckpointError(f"{self.path}: {self.count} bytes, its manifest lists {self.size}")
        if self.digest.hexdigest() != self.sha256:
            raise CheckpointError(f"{self.path}: SHA-256 does not match manifest (file modified or corrupt)")
        return check_format(self.path, bytes(self.kept), size=self.count)


def check_file(path: Path, entry: dict[str, Any]) -> dict[str, dict] | None:
    """One listed file read once, streaming (never through a symlink): size, SHA-256, format."""
    check = FileCheck(path, entry)
    with open_regular(path, CheckpointError) as fh:
        while block := fh.read(READ_BLOCK):
            check.update(block)
    return check.finish()


def verify_contents(directory: Path, manifest: dict[str, Any]) -> dict[str, dict]:
    """A checkpoint folder against its (already parsed) manifest: every listed file present,
    regular, of a kind checkpoints hold, with its size, SHA-256 and format; nothing unlisted,
    no links. Returns {file: tensor entries} for its safetensors files."""
    verify_directory(directory, manifest, hash_files=False)  # presence, sizes, links, extra files
    listed = manifest["files"]
    check_names(directory, listed)
    headers = {name: check_file(directory / name, entry) for name, entry in listed.items()}
    return {name: header for name, header in headers.items() if header is not None}


__all__ = ["CHECKPOINT_FILES", "FileCheck", "MODEL_FILE", "MODEL_INDEX", "SHARD_FILE", "check_file", "check_format",
           "check_names", "verify_contents"]
