"""Continuous batching: many generation requests decoded together by one background thread.

    engine = Engine(model, tokenizer, limits, max_batch_size=16, max_queue=64)
    engine.start()
    handle = engine.submit(prompt_ids, engine.params(len(prompt_ids), max_new_tokens=50))
    for item in handle:          # text deltas (str), then one GenerationResult
        ...
    engine.shutdown(timeout=30)

The engine holds one preallocated KV cache of `max_batch_size` rows ("slots"). Between decode
steps, finished and cancelled requests leave their slots and waiting requests join: a joining
request is prefilled on its own (batch of 1, written into its slot's cache row), then decodes
with the others, one token per request per step, each at its own position. Requests beyond
the free slots wait in a bounded queue; past `max_queue` of them, `submit` refuses with
QueueFullError (back-pressure: the server answers 503 instead of queueing without limit).

Each request is a `generate.SequenceState`, as in `generate.stream`: the same prefill, the
same sampling (one torch.Generator per request, seeded from the request's seed), the same
`advance` deciding eos / stop / length and producing the text deltas. The engine only adds
the scheduling and, in the batched modes, the batched decode step.

Batch invariance. A request's output must not depend on what else is in the batch. BLAS
chooses its matmul kernel, so its summation order, by the number of rows (on CPU MKL a
1-row matmul is a gemv, 2+ rows a gemm, and even 4 vs 16 rows can differ), and attention's
reductions by the key length: a row decoded in a batch of another size gets logits that
differ in the last float bits, and a near-tie can then flip a greedy token or a sample.
Three modes:

  * "padded" (default): every decode step is one batched `Transformer.decode_step` over
    ALL `max_batch_size` cache rows (free slots padded) with the key length fixed at the
    cache's length. The shapes never change, so a row's result depends only on that row:
    outputs are bit-identical alone or batched, and 16 rows cost about 2x one row.
  * "rowwise": each running request alone (B=1, its own length) through
    `SequenceState.decode`, the very step `generate()` takes (bit-identical to it), with no
    batching speed-up.
  * "dynamic": one batched step over the running rows only, key length = the longest:
    fastest, but outputs may differ in the last bits with the batch's composition.

Multi-LoRA (bastion/model/multi_lora.py): on a model with adapters installed, each request
names its adapter (`submit(..., adapter=name)`, None: the base) and every forward is told
which adapter each of its rows uses, so requests for different adapters share decode steps.
A row's adapter delta depends on that row only: the padded mode stays batch-invariant.

Prefill in the padded and rowwise modes is one request at a time (B=1), the shape
generate() uses; requests that join together with the same prompt share one prefill (its
cache rows copied). In dynamic mode the distinct prompts of requests joining together are
prefilled in batched forwards (`_prefill_together`): a GRPO step's prompts in one call
instead of one call each.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import asdict
from typing import Any, Literal

import torch

from bastion.config.schema import GenerateConfig
from bastion.errors import EngineClosedError, QueueFullError
from bastion.infer.generate import (FinishReason, GenerationResult, SamplingParams, SequenceState, Tokenizer,
                                    check_prompt_ids, sampling_params)
from bastion.model.multi_lora import BASE, served_adapters
from bastion.model.transformer import Transformer


class _Sequence(SequenceState):
    """One request inside the engine. Its decode state is touched only by the engine thread;
    `slot`, `cancelled` and `done` change under the engine's lock."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 adapter: str | None = None, adapter_index: int = BASE):
        super().__init__(prompt_ids, params, tokenizer)
        self.handle = handle
        # The LoRA adapter this request runs with (None: the base), by name and by its index
        # in the model's AdapterSet. Keys/values computed under one adapter are not another's:
        # anything shared between requests (a prefill, a prefix cache) is keyed by it.
        self.adapter, self.adapter_index = adapter, adapter_index
        self.slot = -1  # cache row while running
        self.cancelled = False
        self.done = False


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
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, limits: GenerateConfig, *,
                 max_batch_size: int = 16, max_queue: int = 64, device: torch.device | str | None = None,
                 mode: Literal["padded", "rowwise", "dynamic"] = "padded", threads: int | None = None):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        if mode not in ("padded", "rowwise", "dynamic"):
            raise ValueError(f"mode must be padded, rowwise or dynamic, got {mode!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
        if device is not None:
            model.to(device)
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.max_batch_size, self.max_queue, self.mode = max_batch_size, max_queue, mode
        self.threads = threads
        self.device = model.tok_embeddings.weight.device
        self._context = model.cfg.max_seq_len
        # No request can be longer than the longest prompt plus the most new tokens allowed.
        cache_len = min(self._context, (limits.max_prompt_tokens or self._context) + limits.max_new_tokens_ceiling)
        self._cache = model.new_cache(max_batch_size, max_len=cache_len)
        self._adapters = served_adapters(model)  # None: a plain model, nothing per row
        self._slot_cache = [self._cache.rows(i, i + 1) for i in range(max_batch_size)]

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # submitted, no slot yet
        self._running: dict[int, _Sequence] = {}  # slot -> sequence (prefilling or decoding)
        self._closed = False
        self._deadline: float | None = None  # shutdown: cancel what is left after this time
        self._thread: threading.Thread | None = None
        self._was_training = model.training
        self._ids = itertools.count()

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
               loop: asyncio.AbstractEventLoop | None = None, adapter: str | None = None) -> RequestHandle:
        """Queue a request. Raises GenerationLimitError (bad prompt or params), QueueFullError
        (max_queue requests already waiting beyond the free slots), EngineClosedError (after
        shutdown). Pass `loop` (the running event loop) to iterate the handle with `async for`.
        `adapter`: the name of a LoRA adapter installed on the model (ValueError if none is
        installed by that name); None runs the base."""
        prompt_ids = check_prompt_ids(prompt_ids, self.model.cfg.vocab_size or 0)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams (from Engine.params), got {type(params).__name__}")
        # Checked again: nothing over a limit may reach the decode thread.
        params = self.params(len(prompt_ids), **asdict(params))
        handle = RequestHandle(next(self._ids), self, loop)
        seq = _Sequence(handle, prompt_ids, params, self.tokenizer, adapter, self._adapter_index(adapter))
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
        try:
            # The whole thread runs the model only, so inference mode can span it.
            with torch.inference_mode():
                while (work := self._schedule()) is not None:
                    retired, joining = work
                    for seq in retired:
                        self._finish(seq, "cancelled")
                    # After the retired slots are wiped: a joiner may reuse one.
                    if self.mode == "dynamic" and len(joining) > 1:
                        # Batched prefills read the last position's logits only.
                        self._prefill_together([s for s in joining if not s.params.prompt_logprobs])
                        for seq in (s for s in joining if s.params.prompt_logprobs):
                            self._prefill(seq, {})
                    else:
                        prefilled: dict[tuple[int, tuple[int, ...]], tuple[_Sequence, torch.Tensor]] = {}
                        for seq in joining:
                            self._prefill(seq, prefilled)
                    if self._running:
                        self._decode()
        except BaseException as exc:  # a bug: fail every request rather than leave them hanging
            with self._cond:
                self._closed = True
                left = list(self._waiting) + list(self._running.values())
            for seq in left:
                self._finish(seq, error=exc)
            raise

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

    def _prefill(self, seq: _Sequence,
                 prefilled: dict[tuple[int, tuple[int, ...]], tuple[_Sequence, torch.Tensor]]) -> None:
        """The prompt into the sequence's cache row, exactly as generate() does, then the
        first token. Requests joining together with the same prompt (n completions of one
        prompt, GRPO's groups) share one prefill: its keys/values are copied into their rows
        and its logits sampled with each request's own generator - the very values their own
        prefill (batch 1, the same shapes) would compute, at a fraction of the cost. Only
        requests for the same adapter share."""
        key = (seq.adapter_index, tuple(seq.prompt_ids))
        try:
            # Sharing copies keys/values and the last logits only: prompt logprobs need the
            # request's own prefill (every position's logits).
            if key in prefilled and not prefilled[key][0].done and not seq.params.prompt_logprobs:
                source, logits = prefilled[key]
                self._copy_rows(source.slot, seq.slot, len(seq.prompt_ids))
                seq.seed_generator(self.device)
            else:
                with self._adapter_rows([seq.adapter_index]):
                    logits = seq.prefill(self.model, self._slot_cache[seq.slot])
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

    def _copy_rows(self, source: int, target: int, length: int) -> None:
        for k, v in zip(self._cache.k, self._cache.v):
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]

    def _decode(self) -> None:
        """One token for every running sequence."""
        seqs = [self._running[slot] for slot in sorted(self._running)]
        try:
            if self.mode == "padded":
                # Fixed shapes (every slot, the whole cache length): free slots decode a dummy
                # token at position 0 of their own row, which the next prefill overwrites.
                tokens, positions = [0] * self.max_batch_size, [0] * self.max_batch_size
                adapters = [BASE] * self.max_batch_size
                for s in seqs:
                    tokens[s.slot], positions[s.slot], adapters[s.slot] = s.text.ids[-1], s.position, s.adapter_index
                with self._adapter_rows(adapters):
                    every = self.model.decode_step(tokens, self._cache, list(range(self.max_batch_size)), positions,
                                                   key_length=self._cache.max_len)
                logits = every[torch.tensor([s.slot for s in seqs], device=self.device)]
                free = [slot for slot in range(self.max_batch_size) if slot not in self._running]
                if free:  # keep free rows wiped: the dummy step wrote their position 0
                    rows = torch.tensor(free, device=self.device)
                    for k, v in zip(self._cache.k, self._cache.v):
                        k[rows, :, 0] = 0
                        v[rows, :, 0] = 0
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
            return seq.decode(self.model, self._slot_cache[seq.slot])

    def _advance(self, seq: _Sequence, token: int) -> None:
        """A sampled token: its text delta out, and the end if `SequenceState.advance` says so."""
        delta, finish = seq.advance(token)
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
        if seq.slot >= 0:
            # Wipe what it wrote: no request's keys/values outlive it (a batched decode_step
            # reads past a row's own length, masked: stale values there must be finite zeros).
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

