"""The per-document work of `bastion data prepare`, and the process pool that runs it.

What is parallel and what is not: each document's quality verdict, redaction, content hash,
MinHash signature and token ids depend on that document alone, so worker processes compute
them, a chunk of `data.batch_documents` documents per task. Exact dedup, near-dedup (the LSH
index answers "is this like anything kept *before* it?"), the split and the tokenizer sample
are decisions over the whole stream; the parent takes them, in input order, from the workers'
results, which `DocumentPool` hands back in submission order whatever order they finish
in. So the output is byte-identical for any number of workers.

Workers are started with `forkserver` (`spawn` where there is none): forking the parent, whose
HF `tokenizers` thread pool may already be running, can deadlock the child. The fork server is
a fresh single-threaded interpreter that imports this module and the main module once (see
`_preload`; ~2 s for this module, mostly scipy via datasketch, more when the main module
imports torch as the CLI does) and then forks each worker from itself, so workers start in
milliseconds and later pools in the same process reuse it.
Each worker runs its tokenizer single-threaded (`TOKENIZERS_PARALLELISM=false`): the
parallelism is the processes, and N workers x N rayon threads would oversubscribe the cores.
With one worker nothing is started and the same functions run in-process, where `tokenizers`
keeps its own threads. At most `2 x workers` chunks are in flight, so memory stays bounded
however far reading runs ahead. A worker that dies (killed, out of memory) fails the run with
`DataError`; the caller's temporary output is then removed.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import queue
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from bastion.config.schema import DataConfig
from bastion.data.dedup import NearDuplicateIndex
from bastion.data.quality import QualityFilter
from bastion.data.sanitize import Redactor
from bastion.errors import DataError
from bastion.tokenizer import BastionTokenizer



@dataclass
class Cleaned:
    """One document after the per-document hygiene steps."""

    reason: str | None  # the quality filter it failed, or None when kept
    text: str  # redacted text ("" when dropped)
    digest: bytes  # 16-byte SHA-256 prefix of `text` (b"" when dropped)
    signature: np.ndarray | None  # MinHash values (uint32), None when near-dedup is off or no shingles
    redactions: Counter[str]


@dataclass
class TokenizedChunk:
    """A chunk's token ids per split, each document followed by eos, in document order."""

    ids: dict[str, np.ndarray]  # split -> token ids in the dataset dtype
    documents: dict[str, int]
    bytes: dict[str, int]  # UTF-8 bytes of the texts


class DocumentHygiene:
    """Quality filter -> redaction -> content hash -> MinHash signature, for one document."""

    def __init__(self, cfg: DataConfig):
        self.quality = QualityFilter(cfg.quality)
        self.redactor = Redactor(cfg.sanitize) if cfg.sanitize.enabled else None
        self.near = NearDuplicateIndex.from_config(cfg.dedup, seed=cfg.seed) if cfg.dedup.near else None

    def __call__(self, text: str) -> Cleaned:
        reason = self.quality.reason(text)
        if reason:
            return Cleaned(reason, "", b"", None, Counter())
        found: Counter[str] = Counter()
        if self.redactor is not None:
            text, found = self.redactor.redact(text)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]  # collisions negligible
        signature = self.near.signature(text) if self.near is not None else None
        return Cleaned(None, text, digest, signature, found)


def tokenize_documents(tok: BastionTokenizer, dtype: str, docs: list[tuple[str, str]]) -> TokenizedChunk:
    """Encode (text, split) pairs; each split's ids concatenated with eos after every document."""
    encoded = tok.encode_batch([text for text, _ in docs])
    chunk = TokenizedChunk({}, {}, {})
    for split in ("train", "val"):
        parts: list[np.ndarray] = []
        eos = np.array([tok.eos_id], dtype=dtype)
        n = size = 0
        for (text, doc_split), ids in zip(docs, encoded):
            if doc_split == split:
                parts += [np.asarray(ids, dtype=dtype), eos]
                n += 1
                size += len(text.encode("utf-8", "surrogatepass"))
        if parts:
            chunk.ids[split], chunk.documents[split], chunk.bytes[split] = np.concatenate(parts), n, size
    return chunk


class _WorkerState:
    """What a worker builds once and reuses for every chunk: the hygiene steps and the tokenizer."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._hygiene: DocumentHygiene | None = None
        self._tokenizers: dict[str, BastionTokenizer] = {}

    def hygiene(self, texts: list[str]) -> list[Cleaned]:
        if self._hygiene is None:
            self._hygiene = DocumentHygiene(self.cfg)
        return [self._hygiene(t) for t in texts]

    def tokenize(self, tokenizer_file: str, sha256: str, dtype: str, docs: list[tuple[str, str]]) -> TokenizedChunk:
        tok = self._tokenizers.get(sha256)
        if tok is None:
            text = Path(tokenizer_file).read_text(encoding="utf-8")
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != sha256:
                raise DataError(f"{tokenizer_file} changed while the dataset was being written")
            tok = self._tokenizers[sha256] = BastionTokenizer.from_json_str(text)
        return tokenize_documents(tok, dtype, docs)


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_preload())  # takes effect when the server starts (once per process)
    return ctx


def _preload() -> list[str]:
    """What the fork server imports once, so that the workers forked from it need not.

    Besides this module, the main module: multiprocessing imports it in every child, and ours
    (`bastion` -> bastion.cli) imports torch - seconds and hundreds of MB per worker otherwise.
    A script's main is imported by path ("__main__", guarded by `if __name__ == "__main__"`),
    a `python -m` module by name; a package's `__main__` module is skipped (it runs on import,
    and multiprocessing's children skip it too).
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name:
        extra = [] if name == "__main__" or name.endswith(".__main__") else [name]
    else:
        extra = ["__main__"] if getattr(main, "__file__", None) else []
    return [*extra, __name__]


def _worker_main(tasks: Connection, results: Connection, cfg: DataConfig) -> None:
    """A worker: (task name, args) in, (True, result) or (False, exception) out, until None."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; see the module docstring
    state = _WorkerState(cfg)
    tasks_by_name: dict[str, Callable[..., Any]] = {"hygiene": state.hygiene, "tokenize": state.tokenize}
    while True:
        try:
            message = tasks.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        name, args = message
        try:
            reply: tuple[bool, Any] = (True, tasks_by_name[name](*args))
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
            reply = (False, exc if isinstance(exc, DataError) else DataError(f"{type(exc).__name__}: {exc}"))
        results.send(reply)


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process of the pool's context
    results: Connection  # the parent's end: the worker's replies
    outbox: queue.Queue  # tasks its sender thread writes to the worker's task pipe
    sender: threading.Thread


def _send_all(outbox: queue.Queue, tasks: Connection) -> None:
    """A worker's task pipe, fed from a thread: a task larger than the pipe's buffer then never
    blocks the parent while that worker is itself blocked sending a result."""
    while True:
        message = outbox.get()
        try:
            tasks.send(message)
        except OSError:  # the worker died: the parent finds out from its result pipe
            return
        if message is None:
            return


class DocumentPool:
    """`workers` processes (none for 1) running the per-document steps; use as a context manager.

    Each worker has its own task and result pipes (not ProcessPoolExecutor's shared queue: a
    worker killed while writing a result leaves a torn message there that hangs the
    executor's reader forever). Task i goes to worker i mod N and results are read back in
    the same order, so the parent needs no reordering; a dead worker is seen as its result
    pipe's end of file or its process sentinel, whichever comes first."""

    def __init__(self, cfg: DataConfig, workers: int):
        self.workers = workers
        self._local = _WorkerState(cfg) if workers == 1 else None
        self._pool: list[_Worker] = []
        self._outstanding = 0  # tasks sent whose results are not read yet
        if workers > 1:
            ctx = _context()
            for _ in range(workers):
                task_read, task_write = ctx.Pipe(duplex=False)
                result_read, result_write = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_worker_main, args=(task_read, result_write, cfg), daemon=True)
                process.start()
                task_read.close()  # the child's ends: closed here, so a dead child reads as EOF
                result_write.close()
                outbox: queue.Queue = queue.Queue()
                sender = threading.Thread(target=_send_all, args=(outbox, task_write), daemon=True)
                sender.start()
                self._pool.append(_Worker(process, result_read, outbox, sender))

    def __enter__(self) -> DocumentPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(failed=exc[0] is not None)

    def close(self, failed: bool = False) -> None:
        """Stop the workers: asked to finish when every result was read, else (a failure, or
        results nobody will read) killed, their queued chunks dropped."""
        kill = failed or self._outstanding > 0
        for worker in self._pool:
            if kill:
                worker.process.kill()
            worker.outbox.put(None)
        for worker in self._pool:
            worker.process.join()
            worker.results.close()
        self._pool, self._outstanding = [], 0

    def hygiene(self, chunks: Iterable[list[str]]) -> Iterator[list[Cleaned]]:
        """Each chunk's `Cleaned` documents, chunks in the order given."""
        if self._local is not None:
            return map(self._local.hygiene, chunks)
        return self._ordered("hygiene", ((c,) for c in chunks))

    def tokenize(self, tokenizer_file: Path, dtype: str, chunks: Iterable[list[tuple[str, str]]]) -> Iterator[TokenizedChunk]:
        """Each chunk of (text, split) pairs tokenized with the tokenizer saved at `tokenizer_file`."""
        sha = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
        if self._local is not None:
            return (self._local.tokenize(str(tokenizer_file), sha, dtype, c) for c in chunks)
        return self._ordered("tokenize", ((str(tokenizer_file), sha, dtype, c) for c in chunks))

    def _ordered(self, name: str, args: Iterator[tuple[Any, ...]]) -> Iterator[Any]:
        """Results in submission order, with at most 2 x workers tasks queued or running."""
        assert self._pool, "the pool is closed"
        pending: deque[_Worker] = deque()
        for i, task in enumerate(args):
            worker = self._pool[i % len(self._pool)]
            worker.outbox.put((name, task))
            self._outstanding += 1
            pending.append(worker)
            if len(pending) >= 2 * len(self._pool):
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _result(self, worker: _Worker) -> Any:
        wait([worker.results, worker.process.sentinel])
        try:
            ok, value = worker.results.recv()
            self._outstanding -= 1
        except (EOFError, OSError):
            raise DataError(
                "a data prepare worker process died (killed, out of memory, or it failed to start - its "
                "error is printed above; a script that calls prepare_dataset with data.workers > 1 must do "
                "so under `if __name__ == \"__main__\":`); nothing was written - rerun, with fewer "
                "data.workers or a smaller data.batch_documents if memory is short"
            ) from None
        if not ok:
            raise value
        return value
