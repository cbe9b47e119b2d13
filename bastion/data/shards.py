"""Flat token shards: an incremental writer, and a verified, memory-mapped reader.

Layout of a prepared dataset directory:
    index.json          {"format": "bastion-tokens", "version": 1, "dtype", "vocab_size", "eos_id",
                         "splits": {"train": {"shards": [{"file", "tokens", "sha256"}], "tokens", "documents"}, ...}}
    train_000000.bin    raw little-endian token ids, `dtype`, documents separated by eos_id
    val_000000.bin
    tokenizer.json
    report.json
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from bastion.errors import DataError
from bastion.safeio import open_private, read_json_limited, read_text_limited, sha256_file

FORMAT_NAME = "bastion-tokens"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
MAX_INDEX_BYTES = 64 * 2**20
# Shard names come from index.json, which may be hostile: allow only plain names we write.
_SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """Smallest dtype holding every id: uint16 up to 65536 ids (0..65535), else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Appends token arrays to `{split}_NNNNNN.bin`, starting a new file every `shard_tokens`.

    Hashes are computed while writing, so shards are never re-read; memory is O(batch).
    """

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = _DTYPES[dtype]
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._file: Any = None
        self._hash: Any = None
        self._in_shard = 0

    def _open_next(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open_private(self.out_dir / name)
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        while data.size:
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close_current()
                self._open_next()
            take = min(self.shard_tokens - self._in_shard, data.size)
            chunk = data[:take].tobytes()
            self._file.write(chunk)
            self._hash.update(chunk)
            self._in_shard += take
            self.tokens += take
            data = data[take:]

    def close(self, documents: int) -> dict[str, Any]:
        """Finish the last shard; returns this split's index entry."""
        self._close_current()
        return {"shards": self.shards, "tokens": self.tokens, "documents": documents}


def read_index(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate `index.json` of a prepared dataset (structure only, not shard contents)."""
    path = Path(data_dir) / INDEX_FILE
    if not path.exists():
        raise DataError(f"{path} not found: is {data_dir} a dataset made by `bastion data prepare`?")
    index = read_json_limited(path, MAX_INDEX_BYTES, DataError, "dataset index")
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not a {FORMAT_NAME!r} index")
    if index.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported version {index.get('version')!r} (expected {FORMAT_VERSION})")
    if index.get("dtype") not in _DTYPES:
        raise DataError(f"{path}: dtype must be one of {sorted(_DTYPES)}")
    vocab, eos = index.get("vocab_size"), index.get("eos_id")
    if not (_is_int(vocab) and vocab > 0 and _is_int(eos) and 0 <= eos < vocab):
        raise DataError(f"{path}: vocab_size/eos_id missing or inconsistent")
    if vocab > np.iinfo(_DTYPES[index["dtype"]]).max + 1:
        raise DataError(f"{path}: vocab_size {vocab} does not fit dtype {index['dtype']}")
    splits = index.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: missing 'splits'")
    for split, entry in splits.items():
        if split not in SPLITS or not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise DataError(f"{path}: malformed split {split!r}")
        total = 0
        for shard in entry["shards"]:
            ok = (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _SHARD_NAME.match(shard["file"])
                and shard["file"].startswith(f"{split}_")
                and _is_int(shard.get("tokens"))
                and shard["tokens"] > 0
                and isinstance(shard.get("sha256"), str)
            )
            if not ok:
                raise DataError(f"{path}: malformed shard entry in split {split!r}: {str(shard)[:200]}")
            total += shard["tokens"]
        if entry.get("tokens") != total:
            raise DataError(f"{path}: split {split!r} token total does not match its shards")
    return index


def read_tokenizer_json(data_dir: str | os.PathLike[str], max_bytes: int = 64 * 2**20) -> str:
    """The dataset's tokenizer.json text, checked against the SHA-256 in index.json."""
    index = read_index(data_dir)
    path = Path(data_dir) / "tokenizer.json"
    text = read_text_limited(path, max_bytes, DataError, "dataset tokenizer")
    expected = index.get("tokenizer_sha256")
    if expected is not None and hashlib.sha256(text.encode("utf-8")).hexdigest() != expected:
        raise DataError(f"{path} failed its SHA-256 check against index.json (corrupt or tampered)")
    return text


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TokenShards:
    """Read-only view of one split as a single flat token array, across shard files.

    With `verify=True` every shard's SHA-256 is checked against index.json on open (reads each
    shard once); the byte length is always checked, since memory-mapping relies on it.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train", verify: bool = True):
        self.data_dir = Path(data_dir)
        self.split = split
        index = read_index(self.data_dir)
        if split not in index["splits"]:
            raise DataError(f"{self.data_dir / INDEX_FILE}: no split {split!r}")
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.dtype: np.dtype = _DTYPES[index["dtype"]]
        entry = index["splits"][split]
        self.documents: int = entry.get("documents", 0)
        self._maps: list[np.ndarray] = []
        for shard in entry["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} is missing")
            expected = shard["tokens"] * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise DataError(f"shard {path} is {path.stat().st_size} bytes, index.json says {expected}")
            if verify and sha256_file(path) != shard["sha256"]:
                raise DataError(f"shard {path} failed its SHA-256 check (corrupt or tampered)")
            self._maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
        # _starts[i] = global offset of shard i; the extra final entry is the total.
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        self.num_tokens: int = int(self._starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, stitched across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) outside split {self.split!r} of {self.num_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while filled < length:
            local = pos - int(self._starts[shard])
            take = min(length - filled, len(self._maps[shard]) - local)
            out[filled : filled + take] = self._maps[shard][local : local + take]
            filled += take
            pos += take
            shard += 1
        return out
