"""MANIFEST.json: size and SHA-256 of every file in a checkpoint, checked on every load.

The one reader of manifests: checkpoints, adapter folders, packed checkpoints and
checkpoints pulled from a store are all parsed by `parse_manifest`, which checks every
field (format, version, file names that cannot leave the folder, sizes, digests) before
anything is opened by name.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import bastion
from bastion.checkpoint.signing import SIGNATURE
from bastion.errors import CheckpointError
from bastion.safeio import is_sha256, parse_json, read_regular, sha256_file

MANIFEST = "MANIFEST.json"
FORMAT = "bastion-checkpoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 * 2**20
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# A listed file: a plain name inside the folder (no separators, no leading dot, no "..").
FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


def build_manifest(files: dict[str, bytes | Path | tuple[int, str]]) -> dict[str, Any]:
    """Manifest for files given as in-memory bytes, on-disk paths (hashed streaming), or the
    (size, sha256) their writer computed while writing them."""
    entries = {}
    for name, content in sorted(files.items()):
        if isinstance(content, Path):
            entries[name] = {"size": content.stat().st_size, "sha256": sha256_file(content)}
        elif isinstance(content, tuple):
            size, sha = content
            entries[name] = {"size": size, "sha256": sha}
        else:
            entries[name] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bastion_version": bastion.__version__,
        "created_unix": int(time.time()),
        "files": entries,
    }


def is_listable_name(name: Any) -> bool:
    """Whether `name` may appear in a manifest (".partial" is what stores download into)."""
    return (isinstance(name, str) and FILE_NAME.fullmatch(name) is not None and ".." not in name
            and name != MANIFEST and not name.endswith(".partial"))


def parse_manifest(raw: bytes, where: str | Path) -> dict[str, Any]:
    """A manifest's bytes, validated: format and version, a non-empty `files` table whose
    names are plain file names and whose entries are {"size": int >= 0, "sha256": hex}."""
    where = f"{where}"
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{where}: over the {MAX_MANIFEST_BYTES}-byte manifest limit")
    manifest = parse_json(raw, CheckpointError, where)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: manifest lists no files")
    for name, entry in files.items():
        if not is_listable_name(name):
            raise CheckpointError(f"{where}: manifest names an unsafe file name {name!r:.80}")
        size = entry.get("size") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not is_sha256(entry.get("sha256")):
            raise CheckpointError(f"{where}: manifest entry for {name!r} is malformed")
    return manifest


def read_manifest_bytes(directory: Path) -> tuple[dict[str, Any], bytes]:
    """The validated manifest of `directory` and the exact bytes it was parsed from (its
    SHA-256 identifies the checkpoint). Never follows a symlink."""
    path = Path(directory) / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a Bastion checkpoint (or an incomplete one)")
    raw = read_regular(path, MAX_MANIFEST_BYTES, CheckpointError)
    return parse_manifest(raw, path), raw


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated manifest of `directory` (see `parse_manifest`)."""
    return read_manifest_bytes(directory)[0]


def manifest_sha256(directory: Path) -> str:
    """SHA-256 of `directory`'s MANIFEST.json (validated first): the manifest pins every
    file's hash, so this identifies the folder's exact contents."""
    return hashlib.sha256(read_manifest_bytes(directory)[1]).hexdigest()


def verify_directory(directory: Path, manifest: dict[str, Any], hash_files: bool = True) -> None:
    """Every listed file present, regular, right size and hash; no unlisted files; no links."""
    listed = manifest["files"]
    for child in directory.iterdir():
        if child.name == MANIFEST:
            continue
        if child.is_symlink():
            raise CheckpointError(f"{child}: symbolic links are not allowed inside a checkpoint")
        if child.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{child}: pickle-format file inside a checkpoint; pickles can execute code on load and are refused"
            )
        if child.name not in listed and child.name != SIGNATURE:  # a signature covers the manifest: never listed
            raise CheckpointError(f"{child}: file not listed in {MANIFEST} (extra file)")
    for name, entry in listed.items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: size {size} does not match manifest ({entry['size']})")
        if hash_files and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 does not match manifest (file modified or corrupt)")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
