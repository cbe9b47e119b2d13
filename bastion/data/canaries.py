"""Canaries: random secrets planted in training data to measure memorization (Carlini et al.,
"The Secret Sharer", 2019).

A canary is a format such as "my PIN is {secret}" filled with a random secret of `digits`
digits, inserted `repeats` times. After training, `bastion eval memorization` ranks the true
secret among all 10^digits candidates by model likelihood; a model that memorised it ranks it
near the top (high exposure).

`insert_canaries` appends the canary documents to a prepared dataset as one NEW train shard
(existing shards are untouched) and rewrites index.json atomically. The secrets are written
to a records file (0600) that must live outside the dataset: the records are what an auditor
compares against, and must never become training data themselves. Running it again on the
same dataset adds another shard with new canaries; keep each run's records file.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data.shards import _DTYPES, INDEX_FILE, read_index, read_tokenizer_json
from bastion.errors import DataError
from bastion.safeio import fsync_dir, open_private, read_json_limited, replace_file
from bastion.tokenizer import BastionTokenizer

RECORDS_FORMAT = "bastion-canaries"
RECORDS_VERSION = 1
PLACEHOLDER = "{secret}"
MAX_DIGITS = 18  # candidates are int64-indexed
MAX_FORMAT_CHARS = 1000
MAX_DOCUMENTS = 10_000_000
MAX_RECORDS_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Canary:
    id: str
    format: str
    secret: str
    digits: int
    repeats: int
    candidate_space: int  # |R| = 10^digits: every digit string of that length is a candidate

    @property
    def prefix(self) -> str:
        return split_format(self.format)[0]

    @property
    def suffix(self) -> str:
        return split_format(self.format)[1]

    def render(self, secret: str | None = None) -> str:
        prefix, suffix = split_format(self.format)
        return prefix + (self.secret if secret is None else secret) + suffix


@dataclass
class CanaryInsertion:
    canaries: list[Canary]
    shard: str
    documents: int
    tokens: int
    records: Path


def split_format(fmt: str) -> tuple[str, str]:
    """(prefix, suffix) around the one "{secret}". Plain string splitting, never str.format:
    the format is user input, and str.format would evaluate fields like {0.__class__}."""
    if not isinstance(fmt, str) or fmt.count(PLACEHOLDER) != 1:
        raise DataError(f"canary format must contain {PLACEHOLDER} exactly once, e.g. 'my PIN is {PLACEHOLDER}'")
    if len(fmt) > MAX_FORMAT_CHARS:
        raise DataError(f"canary format is longer than {MAX_FORMAT_CHARS} characters")
    prefix, suffix = fmt.split(PLACEHOLDER)
    if not prefix:
        raise DataError("canary format needs text before {secret} (the prefix the audit conditions on)")
    return prefix, suffix


def candidate(index: int, digits: int) -> str:
    """The index-th candidate secret: zero-padded decimal, so all 10^digits strings are covered."""
    return str(index).zfill(digits)


def make_canaries(fmt: str, digits: int, repeats: list[int], per_repeat: int) -> list[Canary]:
    """`per_repeat` canaries for each repetition count, with distinct secrets from the OS CSPRNG."""
    split_format(fmt)
    if not 1 <= digits <= MAX_DIGITS:
        raise DataError(f"--digits must be between 1 and {MAX_DIGITS}")
    if not repeats or any(r < 1 for r in repeats) or per_repeat < 1:
        raise DataError("--repeats values and --per-repeat must be >= 1")
    count = len(repeats) * per_repeat
    space = 10**digits
    if count > space // 2:
        raise DataError(f"{count} canaries need distinct secrets, too many for {digits}-digit secrets")
    if per_repeat * sum(repeats) > MAX_DOCUMENTS:
        raise DataError(f"{per_repeat * sum(repeats):,} canary documents is over the limit of {MAX_DOCUMENTS:,}")
    chosen: set[str] = set()
    canaries = []
    for r in repeats:
        for _ in range(per_repeat):
            secret = candidate(secrets.randbelow(space), digits)
            while secret in chosen:
                secret = candidate(secrets.randbelow(space), digits)
            chosen.add(secret)
            canaries.append(Canary(f"c{len(canaries):03d}", fmt, secret, digits, r, space))
    return canaries


def _check_records_path(out: Path, data_dir: Path) -> Path:
    out = out.expanduser().absolute()
    if out.exists() or out.is_symlink():
        raise DataError(f"{out} already exists; canary records are never overwritten (choose a new --out)")
    if not out.parent.is_dir():
        raise DataError(f"{out.parent} is not a directory")
    real_out, real_data = out.parent.resolve() / out.name, data_dir.resolve()
    if real_out == real_data or real_data in real_out.parents:
        raise DataError(f"{out} is inside the dataset {data_dir}: canary records (the secrets) must be kept away "
                        "from training data; write them elsewhere")
    return out


def _write_records(out: Path, data_dir: Path, shard: dict[str, Any], tokenizer_sha256: str,
                   canaries: list[Canary]) -> None:
    records = {
        "format": RECORDS_FORMAT,
        "version": RECORDS_VERSION,
        "dataset": {"path": str(data_dir.resolve()), "shard": shard["file"], "shard_sha256": shard["sha256"],
                    "tokenizer_sha256": tokenizer_sha256},
        "canaries": [asdict(c) for c in canaries],
    }
    # O_EXCL: refuse to write through anything that appeared at `out` since the check.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write((json.dumps(records, indent=2) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def insert_canaries(data_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                    fmt: str = "my PIN is {secret}", digits: int = 6, repeats: Sequence[int] = (1, 10, 100),
                    per_repeat: int = 2, seed: int = 0) -> CanaryInsertion:
    """Generate canaries, append them to `data_dir` as a new train shard, write records to `out`.

    Each repetition is its own document followed by eos; the documents' order is shuffled with
    `seed` (the secrets themselves come from `secrets`, never from the seed)."""
    data_dir = Path(data_dir)
    index = read_index(data_dir)
    tokenizer_text = read_tokenizer_json(data_dir)  # verified against index.json's SHA-256
    tok = BastionTokenizer.from_json_str(tokenizer_text)
    if tok.eos_id != index["eos_id"] or tok.vocab_size > index["vocab_size"]:
        raise DataError(f"{data_dir}/tokenizer.json does not match index.json (eos id or vocabulary size)")
    out_path = _check_records_path(Path(out), data_dir)
    canaries = make_canaries(fmt, digits, list(repeats), per_repeat)

    docs = [np.asarray([*tok.encode(c.render()), tok.eos_id], dtype=np.int64)
            for c in canaries for _ in range(c.repeats)]
    order = np.random.default_rng(seed).permutation(len(docs))
    tokens = np.concatenate([docs[i] for i in order]).astype(_DTYPES[index["dtype"]])
    data = tokens.tobytes()

    train = index["splits"].setdefault("train", {"shards": [], "tokens": 0, "documents": 0})
    numbers = [int(s["file"][len("train_"):-len(".bin")]) for s in train["shards"]]
    name = f"train_{max(numbers, default=-1) + 1:06d}.bin"
    shard = {"file": name, "tokens": int(tokens.size), "sha256": hashlib.sha256(data).hexdigest()}

    # Records first: if anything below fails they are removed, and the dataset is unchanged
    # unless index.json was replaced (the last, atomic step). Canaries without records would
    # be useless noise in the data.
    _write_records(out_path, data_dir, shard, hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(), canaries)
    tmp = data_dir / f".{name}.tmp-{os.getpid()}"
    try:
        with open_private(tmp) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, data_dir / name)  # not yet listed in index.json, so not yet training data
        fsync_dir(data_dir)
        train["shards"].append(shard)
        train["tokens"] = int(train.get("tokens", 0)) + shard["tokens"]
        train["documents"] = int(train.get("documents", 0)) + len(docs)
        # Where canaries went (never the secrets): lets a reader see the dataset is instrumented.
        index.setdefault("canary_shards", []).append({"file": name, "documents": len(docs), "canaries": len(canaries)})
        replace_file(data_dir / INDEX_FILE, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        if not _index_lists(data_dir, name):
            (data_dir / name).unlink(missing_ok=True)
            out_path.unlink(missing_ok=True)
        raise
    return CanaryInsertion(canaries, name, len(docs), int(tokens.size), out_path)


def _index_lists(data_dir: Path, shard_name: str) -> bool:
    """Whether index.json on disk lists the shard (when in doubt, say yes: keep files)."""
    try:
        shards = read_index(data_dir)["splits"]["train"]["shards"]
    except (DataError, KeyError):
        return True
    return any(s["file"] == shard_name for s in shards)


def read_canaries(path: str | os.PathLike[str]) -> tuple[list[Canary], dict[str, Any]]:
    """Canaries and the dataset description from a records file, validated."""
    path = Path(path)
    records = read_json_limited(path, MAX_RECORDS_BYTES, DataError, "canary records")
    if not isinstance(records, dict) or records.get("format") != RECORDS_FORMAT:
        raise DataError(f"{path}: not a {RECORDS_FORMAT!r} records file")
    if records.get("version") != RECORDS_VERSION:
        raise DataError(f"{path}: unsupported version {records.get('version')!r}")
    items = records.get("canaries")
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: no canaries")
    canaries = []
    for item in items:
        try:
            canary = Canary(**item)
            split_format(canary.format)
            ok = (isinstance(canary.digits, int) and 1 <= canary.digits <= MAX_DIGITS
                  and isinstance(canary.secret, str) and len(canary.secret) == canary.digits and canary.secret.isdigit()
                  and canary.secret.isascii() and canary.candidate_space == 10**canary.digits
                  and isinstance(canary.repeats, int) and canary.repeats >= 1 and isinstance(canary.id, str))
        except (TypeError, DataError):
            ok = False
        if not ok:
            raise DataError(f"{path}: malformed canary record {str(item)[:120]}")
        canaries.append(canary)
    dataset = records.get("dataset") if isinstance(records.get("dataset"), dict) else {}
    return canaries, dataset
