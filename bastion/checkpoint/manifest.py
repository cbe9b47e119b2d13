"""MANIFEST.json: size and SHA-256 of every file in a checkpoint, checked on every load."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import bastion
from bastion.errors import CheckpointError
from bastion.safeio import read_json_limited, sha256_file

MANIFEST = "MANIFEST.json"
FORMAT = "bastion-checkpoint"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 * 2**20
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


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


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not a Bastion checkpoint (or an incomplete one)")
    manifest = read_json_limited(path, MAX_MANIFEST_BYTES, CheckpointError, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: manifest lists no files")
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
            raise CheckpointError(f"{path}: manifest names an unsafe file {name!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{path}: manifest entry for {name!r} is malformed")
    return manifest


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
        if child.name not in listed:
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
