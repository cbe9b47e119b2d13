"""`data.engine: datatrove`: the per-document steps of `bastion data prepare` as datatrove tasks.

Why datatrove rather than Ray Data: it is made for this job (text corpora split into
file-level tasks, the same pipeline run by a local executor, by Slurm or by Ray, completion
markers for re-runs), it is a small pure-Python install (datatrove, loguru, humanize; no
cluster runtime, object store or GCS to operate), and its tasks write files, which is what
the order-dependent part of `prepare` needs: every document's result, in input order, in one
place. Ray Data would also run the map steps, but its blocks are reordered unless ordering is
forced, and it brings a cluster service for what is a batch job over files.

The same functions as the local path run in the tasks (`DocumentHygiene`,
`tokenize_documents`), so the shards are byte-identical to `LocalEngine`'s:
  stage 1 ("clean", `data.tasks` tasks): task r reads its contiguous block of the sorted file
          list and writes each document's `Cleaned` result to `clean/r.bin`;
  decisions (this process): the blocks are read back in rank order - which is input order -
          through the same dedup/split/sample code as the local path, which writes the spill;
  stage 2 ("tokenize", `data.tasks` tasks): task r tokenizes its contiguous range of the
          spill's chunks into `tokens/r.<split>.bin`;
  writing (this process): the rank files are appended to the shards in rank order.
Intermediate files live in the private work folder inside the temporary output folder and
go with it. Differences from the local path: `data.max_total_bytes` is counted per task
(each task streams its own block), and the decisions still run in one process, whose
memory holds the dedup state (see `_Decisions`). For Slurm, pass `executor=` a factory
making `datatrove.executor.SlurmPipelineExecutor` over a work folder on a shared filesystem
(not tested here: no Slurm on this machine).
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bastion.config.schema import DataConfig
from bastion.data.parallel import Cleaned, DocumentHygiene, TokenizedChunk, tokenize_documents
from bastion.data.prepare import chunked, spill_offsets, spill_read
from bastion.data.quality import REASONS
from bastion.data.sources import iter_documents
from bastion.errors import DataError
from bastion.safeio import open_private
from bastion.tokenizer import BastionTokenizer

try:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
except ImportError:  # the optional extra; DatatroveEngine says how to install it
    LocalPipelineExecutor = None  # type: ignore[assignment,misc]
    PipelineStep = object  # type: ignore[assignment,misc]

ExecutorFactory = Callable[[list[Any], int, str], Any]  # (pipeline, tasks, logging_dir) -> executor
_RECORD = struct.Struct("<B16sIIQ")  # reason code (0 = kept), digest, signature length, redactions JSON bytes, text bytes
_READ_PIECE = 1 << 22  # tokens per piece when streaming a task's output into the shards


def block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous [start, end) of n items that task `rank` of `world_size` owns."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _write_cleaned(f: BinaryIO, doc: Cleaned) -> None:
    code = 0 if doc.reason is None else REASONS.index(doc.reason) + 1
    sig = b"" if doc.signature is None else doc.signature.astype("<u4").tobytes()
    found = json.dumps(dict(doc.redactions), sort_keys=True).encode() if doc.redactions else b""
    text = doc.text.encode("utf-8", "surrogatepass")
    f.write(_RECORD.pack(code, doc.digest.ljust(16, b"\0"), len(sig) // 4, len(found), len(text)))
    f.write(sig + found + text)


def _read_cleaned(path: Path) -> Iterator[Cleaned]:
    with open(path, "rb", buffering=1 << 20) as f:
        while header := f.read(_RECORD.size):
            code, digest, sig_len, found_len, text_len = _RECORD.unpack(header)
            sig = np.frombuffer(f.read(sig_len * 4), dtype="<u4").astype(np.uint32) if sig_len else None
            found = Counter(json.loads(f.read(found_len))) if found_len else Counter()
            text = f.read(text_len).decode("utf-8", "surrogatepass")
            if code:
                yield Cleaned(REASONS[code - 1], "", b"", None, Counter())
            else:
                yield Cleaned(None, text, digest, sig, found)


class CleanStep(PipelineStep):  # type: ignore[misc,valid-type]
    """Stage 1: this task's block of files through `DocumentHygiene`, to `<out>/<rank>.bin`."""

    name = "bastion clean"
    type = "bastion"

    def __init__(self, cfg: DataConfig, files: list[str], out_dir: str):
        super().__init__()
        self.cfg, self.files, self.out_dir = cfg, files, out_dir

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        start, end = block(len(self.files), rank, world_size)
        hygiene = DocumentHygiene(self.cfg)
        with open_private(Path(self.out_dir) / f"{rank:06d}.bin") as f:
            for doc in iter_documents(self.cfg, [Path(p) for p in self.files[start:end]]):
                cleaned = hygiene(doc.text)
                _write_cleaned(f, cleaned)
                self.stat_update("documents" if cleaned.reason is None else f"filtered_{cleaned.reason}")
        return iter(())


class TokenizeStep(PipelineStep):  # type: ignore[misc,valid-type]
    """Stage 2: this task's chunks of the spill through `tokenize_documents`, to `<out>/<rank>.<split>.bin`."""

    name = "bastion tokenize"
    type = "bastion"

    def __init__(self, spill: str, offsets: list[int], chunk_documents: int, force: dict[bytes, str],
                 tokenizer_file: str, dtype: str, out_dir: str):
        super().__init__()
        self.spill, self.offsets, self.chunk_documents, self.force = spill, offsets, chunk_documents, force
        self.tokenizer_file, self.dtype, self.out_dir = tokenizer_file, dtype, out_dir

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        start, end = block(len(self.offsets), rank, world_size)
        tok = BastionTokenizer.from_file(self.tokenizer_file)
        out = Path(self.out_dir)
        counts = {"documents": {"train": 0, "val": 0}, "bytes": {"train": 0, "val": 0}}
        files = {s: open_private(out / f"{rank:06d}.{s}.bin") for s in ("train", "val")}
        try:
            if start < end:
                docs = spill_read(Path(self.spill), self.force, offset=self.offsets[start])
                for _, chunk in zip(range(end - start), chunked(docs, self.chunk_documents)):
                    result = tokenize_documents(tok, self.dtype, chunk)
                    for split, ids in result.ids.items():
                        files[split].write(ids.tobytes())
                        counts["documents"][split] += result.documents[split]
                        counts["bytes"][split] += result.bytes[split]
                    self.stat_update("documents", value=len(chunk))
        finally:
            for f in files.values():
                f.close()
        with open_private(out / f"{rank:06d}.json") as f:
            f.write(json.dumps(counts).encode())
        return iter(())


def local_executor(workers: int) -> ExecutorFactory:
    """datatrove's `LocalPipelineExecutor` with `workers` processes."""
    def make(pipeline: list[Any], tasks: int, logging_dir: str) -> Any:
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=logging_dir, skip_completed=False)
    return make


class DatatroveEngine:
    """An `Engine` for `prepare_dataset` running the per-document steps as datatrove tasks."""

    def __init__(self, cfg: DataConfig, work_dir: Path, executor: ExecutorFactory | None = None):
        if LocalPipelineExecutor is None:
            raise DataError("data.engine 'datatrove' needs the datatrove package: pip install 'bastion[datatrove]'")
        self.cfg, self.work = cfg, work_dir
        self.tasks = cfg.tasks
        self.executor = executor or local_executor(cfg.workers)

    def _run(self, step: Any, stage: str, tasks: int) -> None:
        try:
            self.executor([step], tasks, str(self.work / f"logs-{stage}")).run()
        except Exception as exc:  # a task's error, re-raised by datatrove's pool
            raise DataError(f"datatrove {stage} stage failed: {type(exc).__name__}: {exc}") from exc

    def clean(self, files: list[Path]) -> Iterator[list[Cleaned]]:
        out = self.work / "clean"
        out.mkdir(mode=0o700)
        tasks = max(1, min(self.tasks, len(files)))  # a task per block of files; no empty ones
        self._run(CleanStep(self.cfg, [str(p) for p in files], str(out)), "clean", tasks)
        for rank in range(tasks):
            yield from chunked(_read_cleaned(out / f"{rank:06d}.bin"), self.cfg.batch_documents)

    def tokenize(self, tokenizer_file: Path, dtype: str, spill: Path, force: dict[bytes, str]) -> Iterator[TokenizedChunk]:
        out = self.work / "tokens"
        out.mkdir(mode=0o700)
        offsets = spill_offsets(spill, self.cfg.batch_documents)
        tasks = max(1, min(self.tasks, len(offsets)))
        step = TokenizeStep(str(spill), offsets, self.cfg.batch_documents, force, str(tokenizer_file), dtype, str(out))
        self._run(step, "tokenize", tasks)
        for rank in range(tasks):
            counts = json.loads((out / f"{rank:06d}.json").read_text())
            for split in ("train", "val"):
                first = True
                for piece in _pieces(out / f"{rank:06d}.{split}.bin", dtype):
                    docs = counts["documents"][split] if first else 0
                    size = counts["bytes"][split] if first else 0
                    yield TokenizedChunk({split: piece}, {split: docs}, {split: size})
                    first = False

    def close(self) -> None:
        pass


def _pieces(path: Path, dtype: str) -> Iterator[np.ndarray]:
    """A token file in bounded pieces."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        while data := f.read(_READ_PIECE * itemsize):
            yield np.frombuffer(data, dtype=dtype)
