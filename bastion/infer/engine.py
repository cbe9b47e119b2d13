"""Continuous batching: many generation requests decoded together by one background thread.

    engine = Engine(model, tokenizer, limits, max_batch_size=16, max_queue=64)
    engine.start()
    handle = engine.submit(prompt_ids, engine.params(len(prompt_ids), max_new_tokens=50))
    for item in handle:          # text deltas (str), then one GenerationResult
        ...
    engine.shutdown(timeout=30)

The engine runs at most `max_batch_size` requests at once ("slots"). Between steps, finished and cancelled requests leave their slots and waiting requests join; then
each step prefills (part of) the joining prompts and decodes one token for every running
request, each at its own position. Requests beyond the free slots wait in a bounded queue;
past `max_queue` of them, `submit` refuses with QueueFullError (back-pressure: the server
answers 503 instead of queueing without limit).

Each request is a `generate.SequenceState`, as in `generate.stream`: the same sampling (one
torch.Generator per request, seeded from the request's seed), the same `advance` deciding
eos / stop / length and producing the text deltas. The engine adds the scheduling, the
batched decode step and, in the default mode, chunked prefill and the prefix cache.

Batch invariance. A request's output must not depend on what else is in the batch. BLAS
chooses its matmul kernel, so its summation order, by the number of rows (on this CPU MKL
float32 has three families: 1 row, 2 to ~10, ~11 and more), and attention's reductions by
the key length: a row decoded in a batch of another size gets logits that differ in the
last float bits, and a near-tie can then flip a greedy token or a sample. Three modes:

  * "padded" (default): batch-invariant, and as fast as generate() for one stream.
    Decode (`Transformer.decode_rows`): attention runs per request over exactly its own
    cached length, so it depends on that request alone; everything else (projections,
    MLP, norms, head) runs on the running rows in tiles whose row counts all lie in one
    range [lo, hi] where the model gives bit-identical rows. That range is measured when
    the engine starts (`invariant_tile_rows`: the model's own modules, in the engine
    thread, with its threads); e.g. 2-10 rows for the d256 float32 bench model, 1-16 in
    bf16. One stream costs a tile of `lo` rows; a full batch ceil(n / hi) tiles.
    Prefill: in aligned chunks of `prefill_chunk` tokens, each a B=1 forward attending to
    the positions before it, `prefill_step_tokens` prompt tokens per step between decode
    steps (at least one chunk), so a long prompt joining does not stall the running
    streams. A chunk's inputs and shapes never depend on the batch, nor on the prefix
    cache (prefix_cache.py): with `prefix_cache_blocks` > 0, full chunks of finished
    prefills are kept (LRU) under a hash chain of their tokens rooted in the request's
    `cache_namespace`, and a later prompt with the same leading chunks copies them instead
    of computing them - the same bits, so a hit changes latency, never the output.
  * "rowwise": each running request alone (B=1, its own length) through
    `SequenceState.decode`, the very step `generate()` takes (bit-identical to it), with no
    batching speed-up.
  * "dynamic": one batched step over the running rows only, key length = the longest:
    fastest under load, but outputs may differ in the last bits with the batch's
    composition.

Prefill in the rowwise and dynamic modes is the whole prompt in one forward, at join time;
requests that join together with the same prompt share one prefill (its cache rows copied;
in padded mode the later ones wait for the first one's last chunk). In dynamic mode the
distinct prompts of requests joining together are prefilled in batched forwards
(`_prefill_together`): a GRPO step's prompts in one call instead of one call each.

Compiled decode (`compile=True`, padded mode; serve.compile): the decode step's
position-wise pieces run torch.compile'd (bastion/infer/compiled.py), attention per request
staying eager. They compile in the engine thread at `start`, inside the tile probe, which so
measures the compiled code; with a `compile_cache` (checkpoint/compile_cache.py) the sealed
entry is loaded before and what compiled is sealed after. Nothing compiles once requests run.

Multi-LoRA (bastion/model/multi_lora.py): on a model with adapters installed, each request
names its adapter (`submit(..., adapter=name)`, None: the base) and every forward is told
which adapter each of its rows uses, so requests for different adapters share decode steps.
The adapter joins the request's cache namespace (shared prefills and prefix-cache blocks
never cross adapters), and the tile probe runs with rows cycling through the adapters, so
the adapters' own matmuls are held to the same bit-identity as the base's.

Memory. In the padded and rowwise modes each request gets its own KV cache when it starts
(`_cache_of`: its prompt plus its max_new_tokens positions, what generate() allocates),
wiped and freed when it ends: memory follows the running requests (`kv_cache_bytes`), not
`max_batch_size` x the longest allowed request. Dynamic mode batches its decode over rows of
one shared cache, preallocated for `max_batch_size` sequences of the longest allowed length
(prompt limit + new-token ceiling). The prefix cache's `prefix_cache_blocks` blocks are
preallocated. Not paged: a request's cache is sized by its budget, not grown as it decodes.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from bastion.checkpoint.compile_cache import CacheEvent, CompileCache, isolated
from bastion.config.schema import GenerateConfig
from bastion.errors import EngineClosedError, QueueFullError
from bastion.infer.compiled import compiled_row_steps
from bastion.infer.generate import (FinishReason, GenerationResult, SamplingParams, SequenceState, Tokenizer,
                                    check_prompt_ids, sampling_params, token_logprobs)
from bastion.infer.prefix_cache import PrefixCache, block_keys
from bastion.model.multi_lora import BASE, served_adapters
from bastion.model.transformer import EAGER_ROW_STEPS, KVCache, RowSteps, Transformer

logger = logging.getLogger(__name__)


class _Sequence(SequenceState):
    """One request inside the engine. Its decode state is touched only by the engine thread;
    `slot`, `cancelled` and `done` change under the engine's lock."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 cache_namespace: str = "", adapter: str | None = None, adapter_index: int = BASE):
        super().__init__(prompt_ids, params, tokenizer)
        self.handle = handle
        # The LoRA adapter this request runs with (None: the base), by name and by its index
        # in the model's AdapterSet. Keys/values computed under one adapter are not another's:
        # anything shared between requests (a prefill, a prefix cache) is keyed by it.
        self.adapter, self.adapter_index = adapter, adapter_index
        self.slot = -1  # cache row while running
        self.cancelled = False
        self.done = False
        # Chunked prefill (padded mode): positions of the prompt in the cache row so far.
        # Prefix-cache blocks and shared prefills never cross adapters: the namespace holds it.
        self.cache_namespace = f"{adapter}\x00{cache_namespace}" if adapter else cache_namespace
        self.started = False
        self.prefilled = 0
        self.leader: _Sequence | None = None  # the same prompt, prefilling: copy its rows when done
        self.block_keys: list[bytes] = []  # prefix-cache keys of the prompt's full chunks
        self.cache: KVCache | None = None  # its own keys/values (padded, rowwise modes)


class RequestHandle:
    """A submitted request: iterate it for text deltas (str) as they become final, then one
    GenerationResult; the deltas concatenate to exactly result.text.

    Submitted without `loop`: `for item in handle` (blocking). Submitted with `loop`:
    `async for item in handle` on that loop (items arrive via call_soon_threadsafe; nothing
    blocks the loop). If generation fails (e.g. out of memory) iteration raises the error.
    A cancelled request ends with finish_reason "cancelled" and the text decoded so far.
    """

    def __init__(self, request_id: int, engine: Engine, loop: asyncio.AbstractEventLoop | None):
        self.id = request_id
        self._engine = engine
        self._loop = loop
        # asyncio.Queue binds to a loop on first use, so creating it off the loop is fine.
        self._items: queue.SimpleQueue | asyncio.Queue = queue.SimpleQueue() if loop is None else asyncio.Queue()
        self._seq: _Sequence | None = None
        self._result: GenerationResult | None = None
        self._finished = False  # the consumer took the last item

    def cancel(self) -> None:
        """Stop generating (client gone, timeout): a waiting request leaves the queue now, a
        running one frees its slot before the next decode step. Idempotent, thread-safe."""
        if self._seq is not None:
            self._engine._cancel(self._seq)

    def __iter__(self) -> RequestHandle:
        if self._loop is not None:
            raise TypeError("this request was submitted with loop=...: iterate it with `async for`")
        return self

    def __next__(self) -> str | GenerationResult:
        if self._finished:
            raise StopIteration
        return self._take(self._items.get())

    def __aiter__(self) -> RequestHandle:
        if self._loop is None:
            raise TypeError("submit(..., loop=asyncio.get_running_loop()) to iterate a request with `async for`")
        return self

    async def __anext__(self) -> str | GenerationResult:
        if self._finished:
            raise StopAsyncIteration
        return self._take(await self._items.get())

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Blocking: wait for the end (skipping the deltas) and return the GenerationResult.
        Raises TimeoutError after `timeout` seconds (the request keeps running)."""
        if self._loop is not None:
            raise TypeError("this request was submitted with loop=...: iterate it with `async for`")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._result is None:
            if self._finished:
                raise RuntimeError(f"request {self.id} ended without a result")
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._items.get(timeout=wait)
            except queue.Empty:
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s") from None
            self._take(item)
        return self._result

    def _take(self, item: str | GenerationResult | BaseException) -> str | GenerationResult:
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if isinstance(item, GenerationResult):
            self._finished, self._result = True, item
        return item

    def _deliver(self, item: str | GenerationResult | BaseException) -> None:
        """Called from the engine thread (or cancel's caller): hand one item to the consumer."""
        if self._loop is None:
            self._items.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody can read this request any more
            if self._seq is not None:
                self._seq.cancelled = True


PREFILL_TOKENS = 8192  # dynamic mode: padded prompt tokens per batched prefill forward


PROBE_ROWS = 32  # padded mode: the largest tile the probe tries (more rows: several tiles)
PROBE_POSITIONS = 8  # padded mode: the probe's rows sit at positions below this
TILE_TARGET = 8  # padded mode: prefer the smallest tile whose invariant range reaches this many rows


def invariant_tile_rows(model: Transformer, max_rows: int, steps: RowSteps | None = None) -> tuple[int, int]:
    """(lo, hi): row counts P in [lo, hi] for which `Transformer.decode_rows` gives every row
    bit-identical logits, whatever P and whatever the row's place among the P.

    BLAS chooses its kernel by the row count: on CPU MKL float32 measured 1 row (gemv), 2
    to ~10 rows and ~11+ rows as three families, each with its own summation order, the
    boundaries depending on the matrix shapes; oneDNN bf16 keeps 1-32 rows together. So
    this probes the model itself (its real modules: quantized or LoRA linears included), in
    the thread and with the threads that will decode: the logits of random tokens for
    every P up to min(max_rows, PROBE_ROWS), each row at its own position in [0, 8) (RoPE
    at position 0 is exact, which hides how a compiled kernel's rounding of it depends on
    P), grouped into runs of P with equal results, each run checked row by row and with the
    rows reversed. It picks the run with the
    smallest lo among those reaching TILE_TARGET rows (one stream costs lo rows, a full
    batch ceil(n / hi) passes), else the run holding the largest P, else (1, 1): every row
    alone, invariant by construction. Takes 2 * max_rows small decode steps. `steps`: the
    position-wise pieces decode will run (compiled ones with serve.compile: those are
    probed, and compiled by the probe's calls)."""
    rows = min(max_rows, PROBE_ROWS)
    vocab = model.cfg.vocab_size or 1
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (rows,), generator=generator).tolist()
    span = min(PROBE_POSITIONS, model.cfg.max_seq_len)
    places = torch.randint(0, span, (rows,), generator=generator).tolist()
    caches = [model.new_cache(1, max_len=span) for _ in range(rows)]

    # With LoRA adapters installed the rows cycle through the base and every adapter (row i
    # always the same one), so the adapters' own matmuls and path choices are probed too.
    adapters = served_adapters(model)
    slots = 1 if adapters is None else len(adapters.names) + 1

    def logits(ids: list[int], order: range | None = None) -> torch.Tensor:
        order = order if order is not None else range(len(ids))
        for cache in caches[:len(ids)]:  # every call sees the same (empty) earlier positions
            for t in (*cache.k, *cache.v):
                t.zero_()
        with contextlib.nullcontext() if adapters is None else adapters.rows([i % slots for i in order]):
            return model.decode_rows(ids, caches[:len(ids)], [places[i] for i in order], pad_to=len(ids),
                                     steps=steps)

    every = [logits(tokens[:p]) for p in range(1, rows + 1)]  # every[p - 1]: p rows
    runs: list[tuple[int, int]] = []
    for p in range(1, rows + 1):
        if runs and torch.equal(every[p - 1][0], every[runs[-1][0] - 1][0]):
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))

    def holds(lo: int, hi: int) -> bool:
        widest = every[hi - 1]
        return all(torch.equal(every[p - 1], widest[:p]) for p in range(lo, hi + 1)) \
            and torch.equal(logits(tokens[:hi][::-1], range(hi - 1, -1, -1)), widest.flip(0))

    good = [(lo, hi) for lo, hi in runs if holds(lo, hi)]
    wide = [run for run in good if run[1] >= min(TILE_TARGET, rows)]
    if wide:
        return min(wide)
    return good[-1] if good and good[-1][1] == rows else (1, 1)


class Engine:
    """Continuous-batching generation; see the module docstring.

    `device`: where to run (default: the model's device); the model is moved there.
    `threads`: intra-op CPU threads for the engine thread (torch.set_num_threads, which only
    affects the calling thread's OpenMP team); None keeps torch's default. On CPU with few
    cores, 1 can be several times faster for small models: a second OpenMP team (the main
    thread's) oversubscribes the cores, so libgomp's idle workers sleep instead of spinning
    and every small parallel region pays a wake-up.
    The KV cache for `max_batch_size` full-length sequences is allocated here, up front.
    `max_queue`: requests allowed to wait beyond the free slots (0: only free slots).
    Padded mode only: `prefill_chunk` (tokens per prefill chunk, and the prefix cache's
    block size), `prefill_step_tokens` (prompt tokens prefilled between two decode steps,
    at least one chunk), `prefix_cache_blocks` (0: no prefix cache; each block holds
    prefill_chunk positions' keys/values for every layer). `start` runs the tile probe
    (`invariant_tile_rows`) before it returns.
    `compile` (padded mode only): run decode's position-wise pieces torch.compile'd
    (bastion/infer/compiled.py), all compiled by `start` before it returns; the tile probe
    measures the compiled code. `compile_cache`: a CompileCache (checkpoint/compile_cache.py)
    loaded before that compile and saved after it; what happened is in `compile_notes`.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, limits: GenerateConfig, *,
                 max_batch_size: int = 16, max_queue: int = 64, device: torch.device | str | None = None,
                 mode: Literal["padded", "rowwise", "dynamic"] = "padded", threads: int | None = None,
                 prefill_chunk: int = 64, prefill_step_tokens: int = 128, prefix_cache_blocks: int = 0,
                 compile: bool = False, compile_cache: CompileCache | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if mode not in ("padded", "rowwise", "dynamic"):
            raise ValueError(f"mode must be padded, rowwise or dynamic, got {mode!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        for name, value, low in (("prefill_chunk", prefill_chunk, 1), ("prefill_step_tokens", prefill_step_tokens, 1),
                                 ("prefix_cache_blocks", prefix_cache_blocks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if compile and mode != "padded":
            raise ValueError(f"compile needs the padded mode (it compiles decode_rows' pieces), got mode {mode!r}")
        if compile_cache is not None and not compile:
            raise ValueError("compile_cache caches torch.compile's work: pass compile=True as well")
        if device is not None:
            model.to(device)
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.max_batch_size, self.max_queue, self.mode = max_batch_size, max_queue, mode
        self.threads = threads
        self.device = model.tok_embeddings.weight.device
        self._context = model.cfg.max_seq_len
        # No request can be longer than the longest prompt plus the most new tokens allowed.
        cache_len = min(self._context, (limits.max_prompt_tokens or self._context) + limits.max_new_tokens_ceiling)
        # Dynamic mode batches decode_step over rows of one shared cache, allocated up front;
        # the other modes give each request its own cache, sized to its prompt and budget,
        # allocated when it starts and freed when it ends: memory follows the requests.
        self._cache = model.new_cache(max_batch_size, max_len=cache_len) if mode == "dynamic" else None
        self._adapters = served_adapters(model)  # None: a plain model, nothing per row
        self.prefill_chunk, self.prefill_step_tokens = prefill_chunk, prefill_step_tokens
        # Prefix caching needs the padded mode's aligned chunked prefill (see prefix_cache.py).
        self.prefix_cache = (PrefixCache(model, prefix_cache_blocks, prefill_chunk)
                             if prefix_cache_blocks and mode == "padded" else None)

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # submitted, no slot yet
        self._running: dict[int, _Sequence] = {}  # slot -> sequence (prefilling or decoding)
        self._closed = False
        self._deadline: float | None = None  # shutdown: cancel what is left after this time
        self._thread: threading.Thread | None = None
        self._was_training = model.training
        self._ids = itertools.count()
        self._tile_rows = (max_batch_size, max_batch_size)  # padded mode: set by the probe at start
        self.compile, self.compile_cache = compile, compile_cache
        self._row_steps = EAGER_ROW_STEPS  # the compiled pieces once `start` compiled them
        self.compile_notes: list[str] = []  # compile and compile-cache events, in order (also logged)
        self._probed = threading.Event()

    # ---- requests -------------------------------------------------------------------------

    def params(self, prompt_len: int, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[str] | None = None, stop_ids: list[int] | None = None, logprobs: int | None = None,
               prompt_logprobs: bool = False, **adjust: Any) -> SamplingParams:
        """Validate a request of `prompt_len` tokens against the limits with
        `generate.sampling_params`, as generate.stream does (GenerationLimitError naming the
        parameter); None takes the limits' default."""
        return sampling_params(self.limits, self._context, prompt_len, vocab_size=self.model.cfg.vocab_size or 0,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop=stop, stop_ids=stop_ids, logprobs=logprobs,
                               prompt_logprobs=prompt_logprobs, **adjust)

    def submit(self, prompt_ids: list[int], params: SamplingParams, *,
               loop: asyncio.AbstractEventLoop | None = None, cache_namespace: str = "",
               adapter: str | None = None) -> RequestHandle:
        """Queue a request. Raises GenerationLimitError (bad prompt or params), QueueFullError
        (max_queue requests already waiting beyond the free slots), EngineClosedError (after
        shutdown). Pass `loop` (the running event loop) to iterate the handle with `async for`.
        `cache_namespace`: prefix-cache blocks are shared only between requests with the same
        namespace: put in it anything that changes the keys/values (a LoRA adapter's name)
        or must not share them (an API key's id, for per-key isolation); "" is the base model.
        `adapter`: the name of a LoRA adapter installed on the model (ValueError if none is
        installed by that name); None runs the base. It joins the namespace by itself."""
        if not isinstance(cache_namespace, str):
            raise TypeError(f"cache_namespace must be a string, got {type(cache_namespace).__name__}")
        prompt_ids = check_prompt_ids(prompt_ids, self.model.cfg.vocab_size or 0)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams (from Engine.params), got {type(params).__name__}")
        # Checked again: nothing over a limit may reach the decode thread.
        params = self.params(len(prompt_ids), **asdict(params))
        handle = RequestHandle(next(self._ids), self, loop)
        seq = _Sequence(handle, prompt_ids, params, self.tokenizer, cache_namespace, adapter,
                        self._adapter_index(adapter))
        handle._seq = seq
        with self._cond:
            if self._closed:
                raise EngineClosedError("the generation engine is shut down and accepts no new requests")
            free = self.max_batch_size - len(self._running)
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFullError(f"the generation queue is full ({len(self._waiting) - free} requests waiting, "
                                     f"max_queue={self.max_queue}); retry later")
            self._waiting.append(seq)
            self._cond.notify_all()
        return handle

    def _adapter_index(self, adapter: str | None) -> int:
        if adapter is None:
            return BASE
        if self._adapters is None:
            raise ValueError(f"adapter {str(adapter)[:80]!r}: the model has no adapters installed")
        try:
            return self._adapters.index(adapter)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None

    def _adapter_rows(self, indices: list[int]) -> contextlib.AbstractContextManager:
        """Around a forward: row b uses adapter indices[b]. A plain model: nothing to do."""
        return contextlib.nullcontext() if self._adapters is None else self._adapters.rows(indices)

    def _cancel(self, seq: _Sequence) -> None:
        with self._cond:
            if seq.done or seq.cancelled:
                return
            seq.cancelled = True  # a running one leaves at the engine thread's next step
            waiting = seq in self._waiting
            if waiting:
                self._waiting.remove(seq)
            self._cond.notify_all()
        if waiting:
            self._finish(seq, "cancelled")

    @property
    def row_steps(self) -> RowSteps:
        """The position-wise pieces the padded decode step runs: compiled ones once a
        `compile=True` engine started (and its compile worked), else the eager ones."""
        return self._row_steps

    @property
    def prefix_cache_stats(self) -> dict[str, int] | None:
        """Prefix-cache counters (prefix_cache.PrefixCache.stats), None when it is off."""
        return None if self.prefix_cache is None else self.prefix_cache.stats()

    @property
    def stats(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "max_batch_size": self.max_batch_size, "max_queue": self.max_queue}

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the one background thread that schedules and decodes (no-op if running)."""
        with self._cond:
            if self._closed:
                raise EngineClosedError("the generation engine is shut down; build a new one")
            if self._thread is not None:
                return
            self.model.eval()
            self._thread = threading.Thread(target=self._run, name="bastion-engine", daemon=True)
            self._thread.start()
        self._probed.wait()  # padded mode: the tile probe runs in the engine thread, before any request

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests (EngineClosedError), let running and queued ones finish for up
        to `timeout` seconds (None: until done), cancel the rest, and join the thread.
        Blocks: from async code, run it in a thread (asyncio.to_thread)."""
        with self._cond:
            self._closed = True
            if timeout is not None:
                deadline = time.monotonic() + max(0.0, timeout)
                self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            thread = self._thread
            orphans: list[_Sequence] = []
            if thread is None:  # never started: nothing will ever run the queue
                orphans, self._waiting = list(self._waiting), deque()
                if self.compile_cache is not None:  # (a started engine's thread closes it)
                    self.compile_cache.close()
            self._cond.notify_all()
        for seq in orphans:
            self._finish(seq, "cancelled")
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            self.model.train(self._was_training)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        # With a compile cache, Inductor's on-disk cache is a private folder for the engine's
        # life: the only compiled code it reads is the verified entry's or its own.
        isolation = isolated() if self.compile_cache is not None else contextlib.nullcontext()
        try:
            # The whole thread runs the model only, so inference mode can span it.
            with isolation as inductor_dir, torch.inference_mode():
                if self.mode == "padded":
                    self._tile_rows = self._warm_up(inductor_dir) if self.compile else self._probe_tiles()
                self._probed.set()
                self._serve()
        except BaseException as exc:  # a bug: fail every request rather than leave them hanging
            self._probed.set()
            with self._cond:
                self._closed = True
                left = list(self._waiting) + list(self._running.values())
            for seq in left:
                self._finish(seq, error=exc)
            raise
        finally:
            if self.compile_cache is not None:
                self.compile_cache.close()

    def _serve(self) -> None:
        """The engine thread's loop: schedule, prefill, decode, until shut down and idle."""
        while (work := self._schedule()) is not None:
            retired, joining = work
            for seq in retired:
                self._finish(seq, "cancelled")
            # After the retired slots are wiped: a joiner may reuse one.
            if self.mode == "padded":
                self._prefill_step()  # the joiners are prefilling sequences now
            elif self.mode == "dynamic" and len(joining) > 1:
                # Batched prefills read the last position's logits only.
                self._prefill_together([s for s in joining if not s.params.prompt_logprobs])
                for seq in (s for s in joining if s.params.prompt_logprobs):
                    self._prefill(seq, {})
            else:
                prefilled: dict[tuple[str, tuple[int, ...]], tuple[_Sequence, torch.Tensor]] = {}
                for seq in joining:
                    self._prefill(seq, prefilled)
            if any(s.text.ids for s in self._running.values()):
                self._decode()

    def _warm_up(self, inductor_dir: Path | None) -> tuple[int, int]:
        """compile: the cache's entry loaded, the pieces compiled by the tile probe's calls
        (every row count decode will use), what compiled sealed into the cache. A compile
        that fails leaves the engine eager (noted), never failing its start."""
        cache = self.compile_cache
        if cache is not None:
            self._note(cache.load(inductor_dir))
        started = time.perf_counter()
        self._row_steps = compiled_row_steps()
        try:
            rows = invariant_tile_rows(self.model, self.max_batch_size, self._row_steps)
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: serve eager instead
            self._row_steps = EAGER_ROW_STEPS
            self._note(CacheEvent("failed", f"torch.compile failed, decoding eager: {type(exc).__name__}: "
                                            f"{str(exc)[:300]}"), what="compile")
            return self._probe_tiles()
        self._note(CacheEvent("done", f"decode step compiled and probed in {time.perf_counter() - started:.1f} s "
                                      f"(tile rows {rows[0]}-{rows[1]})"), what="compile")
        if cache is not None:
            saved = cache.save(inductor_dir)
            if saved is not None:
                self._note(saved)
        return rows

    def _note(self, event: CacheEvent, what: str = "compile cache") -> None:
        note = f"{what} {event.kind}: {event.detail}"
        self.compile_notes.append(note)
        logger.log(logging.WARNING if event.kind in ("refused", "failed") else logging.INFO, "%s", note)

    def _probe_tiles(self) -> tuple[int, int]:
        try:
            return invariant_tile_rows(self.model, self.max_batch_size)
        except Exception:  # noqa: BLE001 - e.g. out of memory: every row alone is invariant by construction
            logger.warning("the padded mode's tile probe failed; decoding every row alone", exc_info=True)
            return (1, 1)

    def _schedule(self) -> tuple[list[_Sequence], list[_Sequence]] | None:
        """Between steps, under the lock: take cancelled requests out, move waiting ones into
        free slots. Returns (to retire, to prefill); None when shut down and idle. Sleeps
        while there is nothing to do."""
        with self._cond:
            while True:
                retired: list[_Sequence] = []
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    # Shutdown's grace period is over: cancel everything left.
                    for seq in itertools.chain(self._waiting, self._running.values()):
                        seq.cancelled = True
                    retired, self._waiting = list(self._waiting), deque()
                for slot, seq in list(self._running.items()):
                    if seq.cancelled:
                        del self._running[slot]
                        retired.append(seq)
                joining = []
                free = [slot for slot in range(self.max_batch_size) if slot not in self._running]
                while self._waiting and free:
                    seq = self._waiting.popleft()
                    seq.slot = free.pop(0)
                    self._running[seq.slot] = seq
                    joining.append(seq)
                if retired or self._running:
                    return retired, joining
                if self._closed:
                    return None
                self._cond.wait()

    def _prefill_step(self) -> None:
        """Padded mode: chunks of the prefilling sequences, round robin from the oldest,
        until `prefill_step_tokens` prompt tokens were computed (at least one chunk per
        step), so a long prompt joins over several steps while the running streams keep
        decoding."""
        budget = self.prefill_step_tokens
        prefilling = sorted((s for s in self._running.values() if not s.text.ids), key=lambda s: s.handle.id)
        for seq in prefilling:  # joiners first, so that those with one prompt find each other
            if not seq.started:
                try:
                    self._start_prefill(seq)
                except Exception as exc:  # e.g. out of memory for its cache: this request fails
                    self._finish(seq, error=exc)
        progressed = True
        while budget > 0 and progressed:  # round robin, a chunk at a time
            progressed = False
            for seq in prefilling:
                if budget <= 0:
                    break
                if seq.done or seq.text.ids:  # failed, or prefilled (by its leader too)
                    continue
                try:
                    computed = self._prefill_next_chunk(seq)
                except Exception as exc:  # e.g. out of memory: this request fails, the engine goes on
                    self._finish(seq, error=exc)
                    continue
                budget -= computed
                progressed = progressed or computed > 0

    def _prefill_next_chunk(self, seq: _Sequence) -> int:
        """Prefill the sequence's next chunk (on its first turn: reuse cached prefix blocks,
        or wait for a sequence with the same prompt); returns the tokens computed. The
        prompt is computed in chunks [i C, (i + 1) C), aligned whatever was cached, so
        every chunk sees the same inputs and shapes with or without prefix-cache hits."""
        if seq.leader is not None:
            if not seq.leader.done:
                return 0  # the leader's last chunk shares its rows and logits with this one
            seq.leader, seq.started = None, False  # the leader failed or was cancelled: prefill alone
            if self._start_prefill(seq):
                return 0
        if seq.text.ids:  # its leader finished in this step
            return 0
        chunk, prompt, cache = self.prefill_chunk, seq.prompt_ids, seq.cache
        start = seq.prefilled
        end = min(len(prompt), start + chunk)
        ids = torch.tensor([prompt[start:end]], device=self.device)
        if seq.params.prompt_logprobs:  # every position's logits: token i's logprob is read at i - 1
            with self._adapter_rows([seq.adapter_index]):
                logits = self.model(ids, cache=cache, start_pos=start)[0][0]
            targets = torch.tensor(prompt[start + 1:end + 1], device=self.device)
            seq.prompt_logprobs += token_logprobs(logits[:len(targets)], targets, seq.params.logprobs or 0)
            last = logits[-1:]
        else:
            with self._adapter_rows([seq.adapter_index]):
                last = self.model(ids, cache=cache, start_pos=start,
                                  logits_at=torch.tensor([end - start - 1]))[0][:, 0]
        seq.prefilled = end
        if end == len(prompt):
            if self.prefix_cache is not None:
                self.prefix_cache.store(seq.block_keys, seq.cache)
            self._prefilled(seq, last)
        return end - start

    def _start_prefill(self, seq: _Sequence) -> bool:
        """A sequence's first prefill turn: its generator; then either a leader (an earlier
        sequence prefilling the same prompt in the same namespace: True, wait for it) or
        the prefix cache's blocks copied into its cache."""
        seq.started = True
        self._cache_of(seq)  # allocated now: a request waiting in the queue holds no memory
        seq.seed_generator(self.device)
        if seq.params.prompt_logprobs:
            seq.prompt_logprobs = []
        else:
            for other in self._running.values():
                if other is not seq and other.started and other.leader is None and not other.text.ids \
                        and not other.params.prompt_logprobs and other.prompt_ids == seq.prompt_ids \
                        and other.cache_namespace == seq.cache_namespace:
                    seq.leader = other
                    return True
        if self.prefix_cache is not None:
            chunk = self.prefill_chunk
            seq.block_keys = block_keys(seq.cache_namespace, seq.prompt_ids, chunk)
            if not seq.params.prompt_logprobs:  # those need every position's logits: no reuse
                # Never the block holding the last prompt token: its logits start the completion.
                usable = seq.block_keys[:(len(seq.prompt_ids) - 1) // chunk]
                for i, block in enumerate(self.prefix_cache.lookup(usable, len(seq.prompt_ids))):
                    self.prefix_cache.load(block, seq.cache, i * chunk)
                    seq.prefilled = (i + 1) * chunk
        return False

    def _prefilled(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The prompt is in the cache: the first token, for the sequence and for those that
        waited for it (the same prompt: its rows copied, its logits, their own generators)."""
        followers = [s for s in self._running.values() if s.leader is seq]
        token = seq.sample(logits)
        for other in followers:
            other.leader = None
            try:
                self._copy_prompt(seq, other)
                other.prefilled = len(other.prompt_ids)
                other_token = other.sample(logits)
            except Exception as exc:
                self._finish(other, error=exc)
                continue
            self._advance(other, other_token)
        self._advance(seq, token)

    def _prefill(self, seq: _Sequence, prefilled: dict[tuple[str, tuple[int, ...]], tuple[_Sequence, torch.Tensor]]) \
            -> None:
        """The prompt into the sequence's cache row, exactly as generate() does, then the
        first token. Requests joining together with the same prompt (n completions of one
        prompt, GRPO's groups) share one prefill: its keys/values are copied into their rows
        and its logits sampled with each request's own generator - the very values their own
        prefill (batch 1, the same shapes) would compute, at a fraction of the cost. Only
        requests in the same namespace (the same adapter) share."""
        key = (seq.cache_namespace, tuple(seq.prompt_ids))
        try:
            # Sharing copies keys/values and the last logits only: prompt logprobs need the
            # request's own prefill (every position's logits).
            if key in prefilled and not prefilled[key][0].done and not seq.params.prompt_logprobs:
                source, logits = prefilled[key]
                self._copy_prompt(source, seq)
                seq.seed_generator(self.device)
            else:
                with self._adapter_rows([seq.adapter_index]):
                    logits = seq.prefill(self.model, self._cache_of(seq))
                prefilled[key] = (seq, logits)
            token = seq.sample(logits)
        except Exception as exc:  # e.g. out of memory: this request fails, the engine goes on
            self._finish(seq, error=exc)
            return
        self._advance(seq, token)

    def _prefill_together(self, seqs: list[_Sequence]) -> None:
        """Dynamic mode: the distinct prompts of requests joining together in batched
        forwards (right-padded: with causal attention a row's real tokens never see its pads,
        and only their keys/values are copied into the slots), at most PREFILL_TOKENS padded
        tokens per forward, logits of each prompt's last token only. Requests with the same
        prompt share its row. The values match a lone prefill's up to the last float bits
        (another batch shape), which dynamic mode allows. Requests for different LoRA
        adapters are prefilled apart (a shared row would mix their keys/values)."""
        if len({s.adapter_index for s in seqs}) > 1:
            for adapter in dict.fromkeys(s.adapter_index for s in seqs):
                self._prefill_together([s for s in seqs if s.adapter_index == adapter])
            return
        groups: dict[tuple[int, ...], list[_Sequence]] = {}
        for seq in seqs:
            groups.setdefault(tuple(seq.prompt_ids), []).append(seq)
        chunk: list[tuple[int, ...]] = []
        for prompt in sorted(groups, key=len):  # similar lengths together: less padding
            if chunk and len(prompt) * (len(chunk) + 1) > max(PREFILL_TOKENS, len(prompt)):
                self._prefill_chunk(chunk, groups)
                chunk = []
            chunk.append(prompt)
        if chunk:
            self._prefill_chunk(chunk, groups)

    def _prefill_chunk(self, prompts: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[_Sequence]]) -> None:
        length = max(len(p) for p in prompts)  # sorted by length: the last
        try:
            ids = torch.zeros(len(prompts), length, dtype=torch.long, device=self.device)
            for i, prompt in enumerate(prompts):
                ids[i, :len(prompt)] = torch.tensor(prompt, device=self.device)
            cache = self.model.new_cache(len(prompts), max_len=length)
            last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
            with self._adapter_rows([groups[p][0].adapter_index for p in prompts]):  # one adapter
                logits = self.model(ids, cache=cache, start_pos=0, logits_at=last)[0][:, 0]
        except Exception as exc:  # e.g. out of memory: these requests fail, the engine goes on
            for prompt in prompts:
                for seq in groups[prompt]:
                    self._finish(seq, error=exc)
            return
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            for seq in groups[prompt]:
                for (k, v), (k_new, v_new) in zip(zip(self._cache.k, self._cache.v), zip(cache.k, cache.v)):
                    k[seq.slot, :, :n] = k_new[i, :, :n]
                    v[seq.slot, :, :n] = v_new[i, :, :n]
                try:
                    seq.seed_generator(self.device)
                    token = seq.sample(logits[i:i + 1])
                except Exception as exc:
                    self._finish(seq, error=exc)
                    continue
                self._advance(seq, token)

    def _cache_of(self, seq: _Sequence) -> KVCache:
        """The sequence's keys/values: its own cache (made here, zeros, for its prompt plus
        its token budget), or in dynamic mode its row of the shared one."""
        if self._cache is not None:
            return self._cache.rows(seq.slot, seq.slot + 1)
        if seq.cache is None:
            seq.cache = self.model.new_cache(1, max_len=len(seq.prompt_ids) + seq.params.max_new_tokens)
        return seq.cache

    def _copy_prompt(self, source: _Sequence, target: _Sequence) -> None:
        """The prompt's keys/values from `source` into `target` (the same prompt)."""
        length = len(source.prompt_ids)
        for k, v, k_new, v_new in zip(self._cache_of(target).k, self._cache_of(target).v,
                                      self._cache_of(source).k, self._cache_of(source).v):
            k[:, :, :length] = k_new[:, :, :length]
            v[:, :, :length] = v_new[:, :, :length]

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of keys/values held now: the running requests' own caches (or the shared
        one, dynamic mode) plus the prefix cache's blocks."""
        with self._cond:
            caches = [s.cache for s in self._running.values() if s.cache is not None]
        caches += [self._cache] if self._cache is not None else []
        held = sum(t.numel() * t.element_size() for c in caches for t in (*c.k, *c.v))
        if self.prefix_cache is not None:
            held += sum(t.numel() * t.element_size() for t in (*self.prefix_cache.k, *self.prefix_cache.v))
        return held

    def _decode(self) -> None:
        """One token for every running sequence."""
        seqs = [self._running[slot] for slot in sorted(self._running) if self._running[slot].text.ids]
        try:
            if self.mode == "padded":
                parts = []
                for tile, pad_to in self._tiles(seqs):
                    adapters = [s.adapter_index for s in tile] + [BASE] * (pad_to - len(tile))
                    with self._adapter_rows(adapters):
                        parts.append(self.model.decode_rows([s.text.ids[-1] for s in tile], [s.cache for s in tile],
                                                            [s.position for s in tile], pad_to, self._row_steps))
                logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            elif self.mode == "rowwise":
                # Each row alone (B=1, attention over exactly its own cache length): generate()'s
                # own decode step, so bit-identical to it.
                logits = torch.cat([self._decode_alone(s) for s in seqs])
            else:
                with self._adapter_rows([s.adapter_index for s in seqs]):
                    logits = self.model.decode_step([s.text.ids[-1] for s in seqs], self._cache,
                                                    [s.slot for s in seqs], [s.position for s in seqs])
            # Per row: each request has its own temperature/top-k/top-p and its own generator.
            tokens = [s.sample(logits[i:i + 1]) for i, s in enumerate(seqs)]
        except Exception as exc:
            for seq in seqs:
                self._finish(seq, error=exc)
            return
        for seq, token in zip(seqs, tokens):
            self._advance(seq, token)

    def _decode_alone(self, seq: _Sequence) -> torch.Tensor:
        with self._adapter_rows([seq.adapter_index]):
            return seq.decode(self.model, seq.cache)

    def _tiles(self, seqs: list[_Sequence]) -> list[tuple[list[_Sequence], int]]:
        """The running sequences in near-equal tiles of at most `hi` rows, each padded to at
        least `lo` rows: every tile's row count lies in the range the probe found to give
        bit-identical rows, so how the rows are grouped cannot change any row's result."""
        lo, hi = self._tile_rows
        count = -(-len(seqs) // hi)
        size, extra = divmod(len(seqs), count)
        tiles, start = [], 0
        for i in range(count):
            end = start + size + (i < extra)
            tiles.append((seqs[start:end], max(lo, end - start)))
            start = end
        return tiles

    def _advance(self, seq: _Sequence, token: int) -> None:
        """A sampled token: its text delta out, and the end if `SequenceState.advance` says so."""
        try:
            delta, finish = seq.advance(token)
        except Exception as exc:  # e.g. its grammar refused to go on: this request fails, the engine goes on
            self._finish(seq, error=exc)
            return
        if delta:
            seq.handle._deliver(delta)
        if finish is not None:
            self._finish(seq, finish)

    def _finish(self, seq: _Sequence, reason: FinishReason | None = None, *,
                error: BaseException | None = None) -> None:
        """Release the sequence's slot (its cache row wiped) and hand out its last items. The
        engine then keeps no reference to it."""
        with self._cond:
            if seq.done:
                return
            seq.done = True
            if self._running.get(seq.slot) is seq:
                del self._running[seq.slot]
        if seq.cache is not None:  # its own cache: wiped and freed (nothing outlives the request)
            for t in (*seq.cache.k, *seq.cache.v):
                t.zero_()
            seq.cache = None
        elif seq.slot >= 0 and self._cache is not None:
            # Wipe what it wrote in the shared cache: a batched decode_step reads past a row's
            # own length, masked, so stale values there must be finite zeros.
            written = min(len(seq.prompt_ids) + len(seq.text.ids), self._cache.max_len)
            for k, v in zip(self._cache.k, self._cache.v):
                k[seq.slot, :, :written].zero_()
                v[seq.slot, :, :written].zero_()
        if error is not None:
            seq.handle._deliver(error)
            return
        rest, result = seq.finish(reason)
        if rest:
            seq.handle._deliver(rest)
        seq.handle._deliver(result)

