"""`bastion data prepare`: raw files -> tokenizer + packed, hashed token shards.

Each document goes through the hygiene steps in this order: quality filters (on the raw
text) -> PII/secret redaction -> exact dedup -> near-dup (MinHash LSH) -> train/val split.
Redaction comes before dedup and tokenizer training, so no secret reaches the vocabulary or
the shards. Two passes, streaming, so memory does not grow with corpus size (only the
per-document dedup state does):
  pass 1 (scan): read every file; `data.workers` processes filter, redact, hash and MinHash
          each chunk of documents (bastion.data.parallel); this process takes the
          order-dependent decisions (exact and near dedup, split) in input order, appends the
          kept documents to a spill file in the temporary output folder, and keeps a seeded
          sample of at most `tokenizer.train_sample_bytes` of train text;
  then the tokenizer is trained on that sample (or loaded from `tokenizer.path`);
  pass 2 (write): the workers tokenize the spilled documents in chunks of `batch_documents`;
          this process appends eos after each document and writes the shards in order.
The output is byte-identical for any `data.workers`. Disk: the spill holds the kept
(redacted) text once, next to the shards, until the end of the run.
Everything is built in `<output_dir>.tmp-<pid>` and renamed into place only on success.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from bastion.config.schema import DataConfig
from bastion.data.dedup import NearDuplicateIndex
from bastion.data.parallel import Cleaned, DocumentPool, TokenizedChunk
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
T = TypeVar("T")


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
    tokenizer_train_documents: int  # the seeded sample it learnt from (0 when tokenizer.path is given)
    tokenizer_train_bytes: int
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


class _Decisions:
    """The order-dependent steps, taken in the parent in input order: exact dedup, near-dedup
    (MinHash LSH over the workers' signatures) and the split. Memory is the per-document dedup
    state: a 16-byte hash per unique document (~100 B with set overhead) and, with near-dedup
    on, the LSH index (~5.5 KB per kept document at the default threshold; see dedup.py).
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.near = NearDuplicateIndex.from_config(cfg.dedup, seed=cfg.seed) if cfg.dedup.near else None
        self.seen: set[bytes] = set()
        self.read = self.duplicates = self.near_duplicates = 0
        self.filtered: Counter[str] = Counter()
        self.redactions: Counter[str] = Counter()
        self._clusters = 0

    def split_key(self, digest: bytes) -> float:
        # Salted with the seed so a different seed gives a different (still deterministic) split;
        # depends only on content, so it needs no shuffle buffer and is stable under file reordering.
        return _unit_hash(self.cfg.seed, b"", digest)

    @property
    def near_clusters(self) -> int:
        return self.near.clusters_removed if self.near is not None else self._clusters

    def free(self) -> None:
        """Drop the dedup state (keeping its counts) before pass 2."""
        self._clusters = self.near_clusters
        self.seen, self.near = set(), None

    def __call__(self, cleaned: Iterable[Cleaned]) -> Iterator[_Doc]:
        for doc in cleaned:
            self.read += 1
            if doc.reason:
                self.filtered[doc.reason] += 1
                continue
            self.redactions.update(doc.redactions)
            if self.cfg.dedup.exact:
                if doc.digest in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(doc.digest)
            if self.near is not None and self.near.check_and_add_signature(doc.digest, doc.signature) is not None:
                self.near_duplicates += 1
                continue
            yield _Doc(doc.text, doc.digest, "val" if self.split_key(doc.digest) < self.cfg.val_fraction else "train")


def _unit_hash(seed: int, purpose: bytes, digest: bytes) -> float:
    """A number in [0, 1) fixed by (seed, purpose, document content)."""
    salted = hashlib.sha256(seed.to_bytes(8, "little") + purpose + digest).digest()
    return int.from_bytes(salted[:8], "little") / 2**64


class _TokenizerSample:
    """A seeded, bounded sample of the train split for tokenizer training (bottom-k by bytes).

    Every document gets a key from (seed, content); the sample is the documents with the
    smallest keys whose texts fit in `budget` UTF-8 bytes. That depends on the corpus and the
    seed only - not on reading order or worker count - and holds at most `budget` bytes of text.
    The keys' salt differs from the split's, so the sample is not biased toward either end.
    """

    def __init__(self, budget: int, seed: int):
        self.budget, self.seed = budget, seed
        self._heap: list[tuple[float, bytes, str, int]] = []  # (-key, digest, text, bytes): max-heap on key
        self.bytes = 0

    def offer(self, digest: bytes, text: str) -> None:
        size = len(text.encode("utf-8", "surrogatepass"))
        key = _unit_hash(self.seed, b"tokenizer-sample", digest)
        if size > self.budget or (self.bytes + size > self.budget and key >= -self._heap[0][0]):
            return  # would be evicted at once: larger key than everything it would displace
        heapq.heappush(self._heap, (-key, digest, text, size))
        self.bytes += size
        while self.bytes > self.budget:
            self.bytes -= heapq.heappop(self._heap)[3]

    @property
    def documents(self) -> int:
        return len(self._heap)

    def texts(self) -> Iterator[str]:
        """The sample, lowest key first (a fixed order, so training is reproducible)."""
        for _, _, text, _ in sorted(self._heap, reverse=True):
            yield text


CHUNK_CHARS = 1 << 19  # ~512 KB of text per worker task: enough to amortise the IPC, small enough to spread
_WORK = ".work"  # inside the temporary output folder; removed before it is renamed into place
_SPILL = "kept.spill"
_SPLIT_CODES = {"train": 0, "val": 1}
_SPILL_HEADER = struct.Struct("<16sBQ")  # digest, split code, UTF-8 length


def _spill_write(f: BinaryIO, doc: _Doc) -> None:
    data = doc.text.encode("utf-8", "surrogatepass")
    f.write(_SPILL_HEADER.pack(doc.digest, _SPLIT_CODES[doc.split], len(data)))
    f.write(data)


def spill_read(path: Path, force: dict[bytes, str], offset: int = 0) -> Iterator[tuple[str, str]]:
    """(text, split) of every kept document from byte `offset` on, in input order, with the
    split overrides applied."""
    names = {code: split for split, code in _SPLIT_CODES.items()}
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(offset)
        while header := f.read(_SPILL_HEADER.size):
            digest, code, size = _SPILL_HEADER.unpack(header)
            text = f.read(size).decode("utf-8", "surrogatepass")
            yield text, force.get(digest) or names[code]


def spill_offsets(path: Path, every: int) -> list[int]:
    """Byte offsets of documents 0, every, 2 x every, ... in the spill (chunk starts)."""
    offsets, n, pos = [], 0, 0
    with open(path, "rb") as f:
        while header := f.read(_SPILL_HEADER.size):
            if n % every == 0:
                offsets.append(pos)
            size = _SPILL_HEADER.unpack(header)[2]
            pos += _SPILL_HEADER.size + size
            f.seek(pos)
            n += 1
    return offsets


def chunked(items: Iterable[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def chunked_texts(items: Iterable[T], n: int, max_chars: int = CHUNK_CHARS,
                  text: Callable[[Any], str] = str) -> Iterator[list[T]]:
    """Chunks of at most n items and, past the first item, about `max_chars` characters: a
    corpus of few large documents still spreads over the workers. Chunking never changes
    the output (every decision is per document, in order)."""
    chunk: list[T] = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(text(item))
        if len(chunk) == n or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


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


class Engine(Protocol):
    """Runs the per-document steps; `prepare_dataset` takes every decision from their results.

    `LocalEngine` (the default) uses `data.workers` processes on this machine;
    `bastion.data.distributed.DatatroveEngine` runs the same functions as datatrove tasks.
    """

    def clean(self, files: list[Path]) -> Iterator[list[Cleaned]]:
        """Every document of `files`, in order, through `DocumentHygiene`, in chunks."""
        ...

    def tokenize(self, tokenizer_file: Path, dtype: str, spill: Path, force: dict[bytes, str]) -> Iterator[TokenizedChunk]:
        """The spilled documents (see `spill_read`), in order, through `tokenize_documents`, in chunks."""
        ...

    def close(self) -> None: ...


class LocalEngine:
    """`data.workers` processes on this machine (none for 1), through `DocumentPool`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.pool = DocumentPool(cfg, cfg.workers)

    def clean(self, files: list[Path]) -> Iterator[list[Cleaned]]:
        texts = (d.text for d in iter_documents(self.cfg, files))
        return self.pool.hygiene(chunked_texts(texts, self.cfg.batch_documents))

    def tokenize(self, tokenizer_file: Path, dtype: str, spill: Path, force: dict[bytes, str]) -> Iterator[TokenizedChunk]:
        kept = spill_read(spill, force)
        return self.pool.tokenize(tokenizer_file, dtype, chunked_texts(kept, self.cfg.batch_documents, text=lambda d: d[0]))

    def close(self) -> None:
        self.pool.close()


def _engine_for(cfg: DataConfig, work: Path) -> Engine:
    if cfg.engine == "datatrove":
        from bastion.data.distributed import DatatroveEngine  # optional dependency, imported on use

        return DatatroveEngine(cfg, work)
    return LocalEngine(cfg)


def prepare_dataset(cfg: DataConfig, on_progress: Progress | None = None,
                    engine: Callable[[DataConfig, Path], Engine] | None = None) -> PrepareReport:
    """Run the whole pipeline; returns the report (also written as `report.json`).

    `engine(cfg, work_dir)` makes the engine for the per-document steps (default: the one
    `data.engine` names, `LocalEngine` or `bastion.data.distributed.DatatroveEngine`);
    `work_dir` is a private folder for its intermediate files, removed with the temporary output.

    `on_progress(stage, count)` is called per batch with stage "scan" (documents read in pass 1),
    "tokenizer" (vocab size, once), "tokenize" (documents written in pass 2) and "done" (tokens).
    """
    progress = on_progress or (lambda stage, n: None)
    roots = Roots(cfg.allowed_roots)  # resolved once, relative to the current directory
    roots.confine(cfg.output_dir, "data.output_dir")  # refuses '..', and an out-of-roots path or symlink
    out = Path(cfg.output_dir).expanduser().absolute()  # unresolved, so _check_output_dir still sees a symlink
    _check_output_dir(out)
    files = resolve_sources(cfg.sources, cfg.text_suffixes, roots=roots)
    input_bytes = check_sizes(files, cfg.max_file_bytes, cfg.max_total_bytes)
    tokenizer_file = roots.confine(cfg.tokenizer.path, "tokenizer.path") if cfg.tokenizer.path else None

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover (same pid) from an interrupted run
    out.parent.mkdir(parents=True, exist_ok=True)
    make_private_dir(tmp)
    try:
        work = tmp / _WORK
        make_private_dir(work)
        runner = (engine or _engine_for)(cfg, work)
        try:
            decided, sample, stats, force = _scan(cfg, files, runner, work / _SPILL, progress)
            if tokenizer_file is not None:
                tok = BastionTokenizer.from_file(tokenizer_file)
            else:
                tok = BastionTokenizer.train(sample.texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
            progress("tokenizer", tok.vocab_size)
            tok.save(tmp / "tokenizer.json")
            splits = _write_dataset(cfg, tok, runner.tokenize(tmp / "tokenizer.json", token_dtype(tok.vocab_size),
                                                              work / _SPILL, force), tmp, progress)
        finally:
            runner.close()
        shutil.rmtree(work)
        report = PrepareReport(
            output_dir=str(out),
            files=len(files),
            input_bytes=input_bytes,
            documents_read=decided.read,
            documents=splits["train"].documents + splits["val"].documents,
            duplicates_dropped=decided.duplicates,
            near_duplicates_dropped=decided.near_duplicates,
            near_duplicate_clusters=decided.near_clusters,
            filtered=dict(sorted(decided.filtered.items())),
            redactions=dict(sorted(decided.redactions.items())),
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            dtype=token_dtype(tok.vocab_size),
            tokenizer_trained=tokenizer_file is None,
            tokenizer_train_documents=sample.documents if tokenizer_file is None else 0,
            tokenizer_train_bytes=sample.bytes if tokenizer_file is None else 0,
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


def _scan(
    cfg: DataConfig, files: list[Path], engine: Engine, spill: Path, progress: Progress
) -> tuple[_Decisions, _TokenizerSample, dict[str, int], dict[bytes, str]]:
    """Pass 1: read, clean (in the workers), decide (here, in input order), spill the kept
    documents to disk and collect the tokenizer sample. Returns the split overrides too."""
    decided = _Decisions(cfg)
    sample = _TokenizerSample(cfg.tokenizer.train_sample_bytes, cfg.seed)
    collect_sample = not cfg.tokenizer.path
    stats = {"train": 0, "val": 0}
    extremes: dict[str, tuple[float, bytes]] = {}  # lowest/highest split key, for _split_overrides
    with open_private(spill) as f:
        for cleaned in engine.clean(files):
            for doc in decided(cleaned):
                _spill_write(f, doc)
                stats[doc.split] += 1
                key = decided.split_key(doc.digest)
                if "lo" not in extremes or key < extremes["lo"][0]:
                    extremes["lo"] = (key, doc.digest)
                if "hi" not in extremes or key > extremes["hi"][0]:
                    extremes["hi"] = (key, doc.digest)
                # The tokenizer learns from the train split only, so validation text stays unseen.
                if collect_sample and doc.split == "train":
                    sample.offer(doc.digest, doc.text)
            progress("scan", decided.read)
    if stats["train"] + stats["val"] == 0:
        raise DataError(
            f"no documents to train on: {len(files)} file(s), {decided.read} document(s) read, "
            f"{dict(decided.filtered)} dropped by data.quality filters, {decided.duplicates} duplicates, "
            f"{decided.near_duplicates} near-duplicates"
        )
    force = _split_overrides(cfg, stats, extremes)
    decided.free()
    return decided, sample, stats, force


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
    cfg: DataConfig, tok: BastionTokenizer, chunks: Iterator[TokenizedChunk], tmp: Path, progress: Progress,
) -> dict[str, SplitReport]:
    """Pass 2: tokenize the kept documents (in the workers) and append them to the shards in order."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    splits = {"train": SplitReport(), "val": SplitReport()}
    written = 0
    for chunk in chunks:
        for split, ids in chunk.ids.items():
            writers[split].write(ids)
            splits[split].documents += chunk.documents[split]
            splits[split].bytes += chunk.bytes[split]
            written += chunk.documents[split]
        progress("tokenize", written)

    index_splits = {}
    for split, writer in writers.items():
        index_splits[split] = writer.close(splits[split].documents)
        splits[split].tokens, splits[split].shards = writer.tokens, len(writer.shards)
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
    return splits


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
