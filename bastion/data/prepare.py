"""`bastion data prepare`: raw files -> tokenizer + packed, hashed token shards.

Each document goes through the hygiene steps in this order: quality filters (on the raw
text) -> PII/secret redaction -> exact dedup -> near-dup (MinHash LSH) -> train/val split.
Redaction comes before dedup and tokenizer training, so no secret reaches the vocabulary or
the shards. Streaming in two passes over the sources, so memory does not grow with corpus
size (only the per-document dedup state does):
  pass 1 (scan): validate every file, filter/redact/dedup, decide the split and which
          documents are near-duplicates, and (unless `tokenizer.path` is set) feed the
          train-split documents to `train_from_iterator`;
  pass 2 (write): tokenize in batches of `batch_documents`, append eos after each document,
          and write shards incrementally.
Everything is built in `<output_dir>.tmp-<pid>` and renamed into place only on success.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bastion.config.schema import DataConfig
from bastion.data.dedup import NearDuplicateIndex
from bastion.data.quality import QualityFilter
from bastion.data.sanitize import Redactor
from bastion.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    ShardWriter,
    token_dtype,
)
from bastion.data.sources import check_sizes, iter_documents, resolve_sources
from bastion.errors import DataError
from bastion.safeio import make_private_dir, open_private, sha256_file
from bastion.safepath import Roots
from bastion.tokenizer import BastionTokenizer

Progress = Callable[[str, int], None]


@dataclass
class SplitReport:
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the normalised text
    tokens: int = 0  # including one eos per document
    shards: int = 0


@dataclass
class PrepareReport:
    output_dir: str
    files: int
    input_bytes: int  # on-disk size of all source files
    documents_read: int  # before filtering
    documents: int  # kept (train + val)
    duplicates_dropped: int
    near_duplicates_dropped: int
    near_duplicate_clusters: int  # kept documents that had at least one near-duplicate removed
    filtered: dict[str, int]  # quality-filter drops by reason
    redactions: dict[str, int]  # redacted spans by category (EMAIL, SECRET, ...)
    vocab_size: int
    eos_id: int
    dtype: str
    tokenizer_trained: bool
    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)

    @property
    def tokens(self) -> int:
        return self.train.tokens + self.val.tokens

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Doc:
    text: str
    digest: bytes
    split: str


class _Filter:
    """Quality filters, redaction, exact and near-duplicate removal, and the split decision.

    Per-document state is the set of content hashes (16 bytes + set overhead per unique
    document) and, in pass 1, the MinHash LSH index (a few KB per kept document). Pass 1
    records which documents were near-duplicates (`near_dropped`); pass 2 replays that
    decision instead of rebuilding the index.
    """

    def __init__(self, cfg: DataConfig, force: dict[bytes, str] | None = None,
                 near_dropped: set[bytes] | None = None):
        self.cfg = cfg
        self.force = force or {}  # digest -> split, overrides from pass 1 (see _split_overrides)
        self.quality = QualityFilter(cfg.quality)
        self.redactor = Redactor(cfg.sanitize) if cfg.sanitize.enabled else None
        self.replay = near_dropped is not None
        self.near = None if self.replay or not cfg.dedup.near else NearDuplicateIndex.from_config(cfg.dedup, seed=cfg.seed)
        self.near_dropped: set[bytes] = near_dropped if near_dropped is not None else set()
        self.seen: set[bytes] = set()
        self.read = self.duplicates = self.near_duplicates = 0
        self.filtered: Counter[str] = Counter()
        self.redactions: Counter[str] = Counter()

    def split_key(self, digest: bytes) -> float:
        # Salted with the seed so a different seed gives a different (still deterministic) split;
        # depends only on content, so it needs no shuffle buffer and is stable under file reordering.
        salted = hashlib.sha256(self.cfg.seed.to_bytes(8, "little") + digest).digest()
        return int.from_bytes(salted[:8], "little") / 2**64

    @property
    def near_clusters(self) -> int:
        return self.near.clusters_removed if self.near is not None else 0

    def __call__(self, texts: Iterator[str]) -> Iterator[_Doc]:
        for text in texts:
            self.read += 1
            reason = self.quality.reason(text)
            if reason:
                self.filtered[reason] += 1
                continue
            if self.redactor is not None:
                text, found = self.redactor.redact(text)
                self.redactions.update(found)
            digest = hashlib.sha256(text.encode("utf-8")).digest()[:16]  # 128 bits: collisions negligible
            if self.cfg.dedup.exact:
                if digest in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(digest)
            if self.replay and digest in self.near_dropped:
                self.near_duplicates += 1
                continue
            if self.near is not None and self.near.check_and_add(digest, text) is not None:
                self.near_dropped.add(digest)
                self.near_duplicates += 1
                continue
            split = self.force.get(digest) or ("val" if self.split_key(digest) < self.cfg.val_fraction else "train")
            yield _Doc(text, digest, split)


def _texts(cfg: DataConfig, files: list[Path]) -> Iterator[str]:
    return (d.text for d in iter_documents(cfg, files))


def _batched(docs: Iterator[_Doc], n: int) -> Iterator[list[_Doc]]:
    batch: list[_Doc] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_output_dir(out: Path) -> None:
    """Refuse to replace anything that is not an earlier prepared dataset."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"output_dir {out} exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX_FILE).is_file():
        raise DataError(
            f"output_dir {out} is a non-empty directory without {INDEX_FILE} (not a Bastion dataset); "
            "refusing to overwrite it - choose another data.output_dir or empty it"
        )


def _write_json(path: Path, obj: object) -> None:
    with open_private(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def prepare_dataset(cfg: DataConfig, on_progress: Progress | None = None) -> PrepareReport:
    """Run the whole pipeline; returns the report (also written as `report.json`).

    `on_progress(stage, count)` is called per batch with stage "scan" (documents read in pass 1),
    "tokenizer" (vocab size, once), "tokenize" (documents read in pass 2) and "done" (tokens).
    """
    progress = on_progress or (lambda stage, n: None)
    roots = Roots(cfg.allowed_roots)  # resolved once, relative to the current directory
    roots.confine(cfg.output_dir, "data.output_dir")  # refuses '..', and an out-of-roots path or symlink
    out = Path(cfg.output_dir).expanduser().absolute()  # unresolved, so _check_output_dir still sees a symlink
    _check_output_dir(out)
    files = resolve_sources(cfg.sources, cfg.text_suffixes, roots=roots)
    input_bytes = check_sizes(files, cfg.max_file_bytes, cfg.max_total_bytes)

    # ---- pass 1: scan (+ train tokenizer) ---------------------------------------------
    scan = _Filter(cfg)
    stats = {"train": 0, "val": 0}
    extremes: dict[str, tuple[float, bytes]] = {}  # lowest/highest split key, for _split_overrides

    def scanned() -> Iterator[list[str]]:
        for batch in _batched(scan(_texts(cfg, files)), cfg.batch_documents):
            for doc in batch:
                stats[doc.split] += 1
                key = scan.split_key(doc.digest)
                if "lo" not in extremes or key < extremes["lo"][0]:
                    extremes["lo"] = (key, doc.digest)
                if "hi" not in extremes or key > extremes["hi"][0]:
                    extremes["hi"] = (key, doc.digest)
            progress("scan", scan.read)
            # The tokenizer learns from the train split only, so validation text stays unseen.
            yield [d.text for d in batch if d.split == "train"]

    if cfg.tokenizer.path:
        tok = BastionTokenizer.from_file(roots.confine(cfg.tokenizer.path, "tokenizer.path"))
        for _ in scanned():
            pass
    else:
        tok = BastionTokenizer.train(scanned(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    kept = stats["train"] + stats["val"]
    if kept == 0:
        raise DataError(
            f"no documents to train on: {len(files)} file(s), {scan.read} document(s) read, "
            f"{dict(scan.filtered)} dropped by data.quality filters, {scan.duplicates} duplicates, "
            f"{scan.near_duplicates} near-duplicates"
        )
    force = _split_overrides(cfg, stats, extremes)
    near_dropped, near_clusters = scan.near_dropped, scan.near_clusters
    scan.seen, scan.near = set(), None  # free pass 1's hash set and LSH index before pass 2 builds its own
    progress("tokenizer", tok.vocab_size)

    # ---- pass 2: tokenize + write into a temp dir ---------------------------------------
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover (same pid) from an interrupted run
    out.parent.mkdir(parents=True, exist_ok=True)
    make_private_dir(tmp)
    try:
        splits, filt = _write_dataset(cfg, tok, files, force, near_dropped, tmp, progress)
        report = PrepareReport(
            output_dir=str(out),
            files=len(files),
            input_bytes=input_bytes,
            documents_read=filt.read,
            documents=splits["train"].documents + splits["val"].documents,
            duplicates_dropped=filt.duplicates,
            near_duplicates_dropped=filt.near_duplicates,
            near_duplicate_clusters=near_clusters,
            filtered=dict(sorted(filt.filtered.items())),
            redactions=dict(sorted(filt.redactions.items())),
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            dtype=token_dtype(tok.vocab_size),
            tokenizer_trained=not cfg.tokenizer.path,
            train=splits["train"],
            val=splits["val"],
        )
        _write_json(tmp / "report.json", report.to_dict())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("done", report.tokens)
    return report


def _split_overrides(
    cfg: DataConfig, stats: dict[str, int], extremes: dict[str, tuple[float, bytes]]
) -> dict[bytes, str]:
    """Guarantee both splits are non-empty when val_fraction > 0, deterministically.

    A hash split of a tiny corpus can leave one side empty; we then move the document with the
    most extreme split key across. With a single document that is impossible, so we say so.
    """
    if cfg.val_fraction == 0:
        return {}
    if stats["train"] + stats["val"] < 2:
        raise DataError(
            "data.val_fraction > 0 needs at least 2 documents after filtering, found 1 "
            "(a .txt/.md file is one document): add files, use .jsonl with one document per line, "
            "or set data.val_fraction: 0"
        )
    if stats["val"] == 0:
        return {extremes["lo"][1]: "val"}
    if stats["train"] == 0:
        return {extremes["hi"][1]: "train"}
    return {}


def _write_dataset(
    cfg: DataConfig, tok: BastionTokenizer, files: list[Path], force: dict[bytes, str], near_dropped: set[bytes],
    tmp: Path, progress: Progress,
) -> tuple[dict[str, SplitReport], _Filter]:
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    splits = {"train": SplitReport(), "val": SplitReport()}
    filt = _Filter(cfg, force, near_dropped)
    eos = np.array([tok.eos_id], dtype=np.int64)
    for batch in _batched(filt(_texts(cfg, files)), cfg.batch_documents):
        encoded = tok.encode_batch([d.text for d in batch])
        for split in ("train", "val"):
            parts = []
            for doc, ids in zip(batch, encoded):
                if doc.split == split:
                    parts += [np.asarray(ids, dtype=np.int64), eos]
                    splits[split].documents += 1
                    splits[split].bytes += len(doc.text.encode("utf-8"))
            if parts:
                writers[split].write(np.concatenate(parts))
        progress("tokenize", filt.read)

    index_splits = {}
    for split, writer in writers.items():
        index_splits[split] = writer.close(splits[split].documents)
        splits[split].tokens, splits[split].shards = writer.tokens, len(writer.shards)
    tok.save(tmp / "tokenizer.json")
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": sha256_file(tmp / "tokenizer.json"),
        "splits": index_splits,
    }
    _write_json(tmp / INDEX_FILE, index)
    return splits, filt


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished dataset over `out`; an old dataset is moved aside, then deleted."""
    _check_output_dir(out)  # re-check: something may have appeared while we worked
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous dataset back rather than leave nothing
        raise
    fd = os.open(out.parent, os.O_RDONLY)  # persist the rename itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old)
