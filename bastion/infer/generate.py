"""Text generation with a KV cache, under hard request limits.

Every request is checked against `GenerateConfig` before any compute: a request over a limit
is refused with `GenerationLimitError` naming the parameter, never silently cut short.
`sampling_params` is that check and `SequenceState` the per-token decode logic, for
`generate()`/`stream()` here and for the continuous-batching engine (engine.py) alike.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from bastion.config.schema import GenerateConfig
from bastion.errors import GenerationLimitError
from bastion.infer.sampling import penalize, sample_next
from bastion.infer.structured import Constraint
from bastion.model.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from bastion.tokenizer.chat import ChatFormat

MAX_STOP_CHARS = 256


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


FinishReason = Literal["stop", "length", "eos", "cancelled"]  # cancelled: engine requests only


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (log-softmax of its raw logits: before
    temperature, top-k or top-p), and the `top` most likely tokens there as (id, logprob),
    most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class TextDelta(str):
    """A text delta that also carries the logprobs (TokenLogprob) of the tokens sampled since
    the previous delta, when the request asked for logprobs: a plain `str` to every consumer
    that only wants text. The tokens of text held back at the end (a stop string, a pending
    character) and the end token are in the GenerationResult only."""

    logprobs: list[TokenLogprob]


@dataclass(frozen=True)
class GenerationResult:
    text: str  # the completion only, cut before the stop string if one matched
    token_ids: list[int]  # completion ids (without eos; with a stop, up to the token that completed it)
    prompt_tokens: int
    finish_reason: FinishReason
    end_id: int | None = None  # finish_reason "eos": the end token sampled (eos or a stop id), not in token_ids
    logprobs: list[TokenLogprob] | None = None  # SamplingParams.logprobs set: one per token_ids entry
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt_logprobs set: prompt tokens 1.. (the first has none)
    end_logprob: TokenLogprob | None = None  # logprobs set and finish_reason "eos": the end token's


def check_request(prompt_tokens: int, max_new_tokens: int | None, stop: list[str] | None,
                  limits: GenerateConfig, context_size: int) -> int:
    """Validate a request against the limits; returns the effective max_new_tokens."""
    n = limits.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int):
        raise GenerationLimitError(f"max_new_tokens must be an integer, got {n!r}")
    if n < 1:
        raise GenerationLimitError(f"max_new_tokens must be >= 1, got {n}")
    if n > limits.max_new_tokens_ceiling:
        raise GenerationLimitError(
            f"max_new_tokens ({n}) exceeds the limit generate.max_new_tokens_ceiling ({limits.max_new_tokens_ceiling})")
    if prompt_tokens < 1:
        raise GenerationLimitError("prompt is empty (0 tokens); give at least one token of prompt")
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise GenerationLimitError(
            f"prompt has {prompt_tokens} tokens, over the limit generate.max_prompt_tokens ({limits.max_prompt_tokens})")
    if prompt_tokens > context_size:
        raise GenerationLimitError(f"prompt has {prompt_tokens} tokens, over the model's context size ({context_size})")
    if prompt_tokens + n > context_size:
        raise GenerationLimitError(
            f"prompt tokens ({prompt_tokens}) + max_new_tokens ({n}) = {prompt_tokens + n} exceeds the model's "
            f"context size ({context_size}); lower max_new_tokens to at most {context_size - prompt_tokens}")
    if stop is not None:
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
            raise GenerationLimitError(f"stop must be a list of strings, got {type(stop).__name__}")
        if len(stop) > limits.max_stop_strings:
            raise GenerationLimitError(
                f"stop has {len(stop)} strings, over the limit generate.max_stop_strings ({limits.max_stop_strings})")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise GenerationLimitError(f"stop[{i}] must be a non-empty string, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise GenerationLimitError(f"stop[{i}] is {len(s)} characters, over the limit of {MAX_STOP_CHARS}")
    return n


def check_prompt_ids(prompt_ids: object, vocab_size: int) -> list[int]:
    """A copy of `prompt_ids` if it is a non-empty list of token ids in [0, vocab_size); the
    error names the first id that is not."""
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise GenerationLimitError(f"prompt ids must be a non-empty list of ids in [0, {vocab_size})")
    for i in prompt_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise GenerationLimitError(f"token id {str(i)[:20]} is outside the model's vocabulary [0, {vocab_size})")
    return list(prompt_ids)


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings, validated and with defaults filled: build it with
    `sampling_params` (or `Engine.params`). `Engine.submit` checks it again, since a
    dataclass can also be built by hand."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # record each sampled token's logprob and this many top alternatives
    prompt_logprobs: bool = False  # and the prompt's (from the prefill's logits; top as `logprobs`)
    min_p: float = 0.0  # sampling.sample_next
    repetition_penalty: float = 1.0  # sampling.penalize, in its order
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    grammar: str | None = None  # structured output: an llguidance grammar from structured.compile_grammar

    @property
    def penalized(self) -> bool:
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or bool(self.frequency_penalty) \
            or bool(self.presence_penalty)


MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit); the server's own is lower


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, top: int) -> list[TokenLogprob]:
    """logits [T, V] and the token chosen after each [T] -> T TokenLogprobs (log-softmax in
    float32; `top` alternatives each)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets.reshape(-1, 1)).squeeze(-1).tolist()
    if top:
        values, indices = logp.topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(targets.tolist(), chosen, alternatives)]


def sampling_params(limits: GenerateConfig, context_size: int, prompt_len: int, *, vocab_size: int,
                    max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                    stop_ids: list[int] | None = None, logprobs: int | None = None,
                    prompt_logprobs: bool = False, min_p: float | None = None, repetition_penalty: float | None = None,
                    frequency_penalty: float | None = None, presence_penalty: float | None = None,
                    logit_bias: dict[int, float] | tuple[tuple[int, float], ...] | None = None,
                    grammar: str | None = None) -> SamplingParams:
    """The one check of a request's settings, for generate() and the engine alike: the length
    limits (`check_request`), then the sampling bounds, with None taking `limits`' default.
    Raises GenerationLimitError naming the parameter."""
    n_new = check_request(prompt_len, max_new_tokens, stop, limits, context_size)
    temperature = limits.temperature if temperature is None else temperature
    top_k = limits.top_k if top_k is None else top_k
    top_p = limits.top_p if top_p is None else top_p
    # Same bounds as GenerateConfig, re-checked because per-request values bypass the schema.
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not 0 <= temperature <= 100:
        raise GenerationLimitError(f"temperature must be a number in [0, 100], got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationLimitError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerationLimitError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise GenerationLimitError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if stop_ids is not None and not isinstance(stop_ids, (list, tuple, set, frozenset)):
        raise GenerationLimitError(f"stop_ids must be a list of token ids, got {type(stop_ids).__name__}")
    for i in stop_ids or ():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise GenerationLimitError(f"stop_ids must be token ids in [0, {vocab_size}), got {i!r}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise GenerationLimitError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {logprobs!r}")
    if prompt_logprobs and logprobs is None:
        raise GenerationLimitError("prompt_logprobs needs logprobs (the number of top alternatives, 0 for none)")
    min_p = _number("min_p", 0.0 if min_p is None else min_p, 0.0, 1.0)
    repetition_penalty = _number("repetition_penalty", 1.0 if repetition_penalty is None else repetition_penalty,
                                 MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
    frequency_penalty = _number("frequency_penalty", frequency_penalty or 0.0, -2.0, 2.0)
    presence_penalty = _number("presence_penalty", presence_penalty or 0.0, -2.0, 2.0)
    bias = []
    if isinstance(logit_bias, tuple):  # SamplingParams' own (id, bias) pairs, checked again by Engine.submit
        try:
            logit_bias = dict(logit_bias)
        except (TypeError, ValueError):
            pass
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise GenerationLimitError(f"logit_bias must map token ids to numbers, got {type(logit_bias).__name__}")
    for token, value in (logit_bias or {}).items():
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise GenerationLimitError(f"logit_bias: token ids must be in [0, {vocab_size}), got {token!r}")
        bias.append((token, _number(f"logit_bias[{token}]", value, -100.0, 100.0)))
    if grammar is not None and (not isinstance(grammar, str) or not 0 < len(grammar) <= MAX_GRAMMAR_CHARS):
        raise GenerationLimitError(f"grammar must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters "
                                   "(from structured.compile_grammar)")
    return SamplingParams(max_new_tokens=n_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop=tuple(stop or ()), stop_ids=tuple(dict.fromkeys(stop_ids or ())),  # no duplicates
                          logprobs=logprobs, prompt_logprobs=bool(prompt_logprobs), min_p=min_p,
                          repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                          presence_penalty=presence_penalty, logit_bias=tuple(sorted(bias)), grammar=grammar)


MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MAX_GRAMMAR_CHARS = 4_000_000  # a compiled grammar; the schema behind it is bounded far lower by the server


def _number(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float in [low, high], else GenerationLimitError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise GenerationLimitError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _emittable(text: str, stop: list[str]) -> int:
    """How much of `text` can be yielded for sure: all but the longest suffix that could be
    the start of a stop string (the text would be cut there if the stop string completes)."""
    for k in range(min(max(map(len, stop), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop):
            return len(text) - k
    return len(text)


class IncrementalText:
    """Incremental detokenisation, fed one token at a time (stream() and the engine share it).

    Decoding the whole completion every step would be quadratic: as in vLLM, decode just the
    newest tokens with the previous chunk as left context. Byte-level BPE splits characters
    across tokens: a window ending in U+FFFD stops mid-character, so it stays pending until
    the other bytes arrive. Stop strings are searched only where a new match can end, and
    text is emitted only up to the longest suffix that could still start a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text, self.pending = "", ""  # text: final; pending: an incomplete character
        self.prefix = self.read = 0  # ids[prefix:read] are already in text, re-decoded as context
        self.emitted = 0  # len(text) already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token: (text that became final, whether a stop string completed)."""
        ids = self.ids
        ids.append(token_id)
        known = self.tokenizer.decode(ids[self.prefix:self.read])
        window = self.tokenizer.decode(ids[self.prefix:])
        self.pending = window[len(known):]
        searched = len(self.text)
        if window.startswith(known) and not window.endswith("\ufffd"):
            self.text, self.pending = self.text + self.pending, ""
            self.prefix, self.read = self.read, len(ids)
        full = self.text + self.pending
        hits = [i for i in (full.find(s, max(0, searched - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.pending = full[:min(hits)], ""
            return "", True
        end = _emittable(self.text, self.stop)
        if end <= self.emitted:
            return "", False
        delta, self.emitted = self.text[self.emitted:end], end
        return delta, False

    def close(self) -> str:
        """Generation ended: the rest of the text (an incomplete character stays as U+FFFD)."""
        self.text, self.pending = self.text + self.pending, ""
        rest, self.emitted = self.text[self.emitted:], len(self.text)
        return rest


class SequenceState:
    """One sequence being decoded, B=1 (generate() and the engine share it, so they cannot
    drift apart): prefill, sample, and `advance`, the one place that decides eos / stop id,
    stop string and length, and produces the text deltas."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer):
        self.prompt_ids, self.params = prompt_ids, params
        eos = getattr(tokenizer, "eos_id", None)
        self.end_ids = frozenset(params.stop_ids) | (frozenset() if eos is None else frozenset({eos}))
        self.text = IncrementalText(tokenizer, list(params.stop))
        self.generator: torch.Generator | None = None  # made by prefill, on the model's device
        self.end_id: int | None = None
        self.end_logprob: TokenLogprob | None = None
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.logprobs_out = 0  # how many of them a TextDelta has carried out
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.constraint: Constraint | None = None  # structured output: built at the first sample

    @property
    def position(self) -> int:
        """Where the newest token (the next decode step's input) sits."""
        return len(self.prompt_ids) + len(self.text.ids) - 1

    def prefill(self, model: Transformer, cache: KVCache) -> torch.Tensor:
        """The whole prompt in one forward of batch 1 into `cache` (a fresh one, or one row):
        the logits [1, V] for the first token. Seeds the sequence's generator."""
        device = model.tok_embeddings.weight.device
        self.seed_generator(device)
        ids = torch.tensor([self.prompt_ids], device=device)
        logits, _ = model(ids, cache=cache, start_pos=0)
        if self.params.prompt_logprobs:  # token i's logprob is read at position i - 1
            self.prompt_logprobs = token_logprobs(logits[0, :-1], ids[0, 1:], self.params.logprobs or 0)
        return logits[:, -1]

    def seed_generator(self, device: torch.device) -> None:
        """This request's own sampling generator (a prefill does it; so does sharing one)."""
        self.generator = torch.Generator(device=device)
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    def decode(self, model: Transformer, cache: KVCache) -> torch.Tensor:
        """One decode step of batch 1, attention over exactly this sequence's cache length:
        the logits [1, V] after the newest token."""
        idx = torch.tensor([[self.text.ids[-1]]], device=model.tok_embeddings.weight.device)
        logits, _ = model(idx, cache=cache, start_pos=self.position)
        return logits[:, -1]

    def sample(self, logits: torch.Tensor) -> int:
        """logits [1, V] -> the next token, with this request's settings and generator."""
        p = self.params
        adjusted = logits
        if p.penalized:
            adjusted = penalize(logits, history=self.prompt_ids + self.text.ids, completion=self.text.ids,
                                logit_bias=p.logit_bias, repetition_penalty=p.repetition_penalty,
                                frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty)
        if p.grammar is not None:
            if self.constraint is None:
                self.constraint = Constraint(p.grammar, self.text.tokenizer, logits.size(-1), self.end_ids)
            adjusted = self.constraint.mask(adjusted)
        token = int(sample_next(adjusted, p.temperature, p.top_k, p.top_p, self.generator, p.min_p))
        if self.logprobs is not None:
            self.logprobs.append(token_logprobs(logits[-1:], torch.tensor([token], device=logits.device),
                                                p.logprobs or 0)[0])
        return token

    def advance(self, token: int) -> tuple[str, FinishReason | None]:
        """A sampled token: (text that became final, why generation ends or None)."""
        if token in self.end_ids:
            self.end_id = token
            if self.logprobs:
                self.end_logprob = self.logprobs.pop()  # the end token is not part of the completion
            return "", "eos"
        if self.constraint is not None:
            self.constraint.consume(token)
        delta, stopped = self.text.push(token)
        if stopped:
            return "", "stop"
        if delta and self.logprobs is not None:
            delta = TextDelta(delta)
            delta.logprobs, self.logprobs_out = self.logprobs[self.logprobs_out:], len(self.logprobs)
        if len(self.text.ids) == self.params.max_new_tokens:
            return delta, "length"  # out of tokens: an incomplete character stays as U+FFFD
        return delta, None

    def finish(self, reason: FinishReason) -> tuple[str, GenerationResult]:
        """The end: (the rest of the text, held back for a stop string that never completed
        or a pending character; the GenerationResult)."""
        rest = self.text.close()
        return rest, GenerationResult(text=self.text.text, token_ids=list(self.text.ids),
                                      prompt_tokens=len(self.prompt_ids), finish_reason=reason, end_id=self.end_id,
                                      logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                                      end_logprob=self.end_logprob)


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], *, limits: GenerateConfig,
           max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None,
           stop: list[str] | None = None, stop_ids: list[int] | None = None, logprobs: int | None = None,
           prompt_logprobs: bool = False, **adjust: Any) -> Iterator[str | GenerationResult]:
    """Yield completion text deltas as they become final, then one GenerationResult.

    `prompt` is text, or token ids (a chat prompt from `ChatFormat.encode_prompt`, whose
    special tokens text cannot produce). Generation ends at eos or any of `stop_ids` (e.g.
    `ChatFormat.stop_ids`, the end-of-turn markers), finish_reason "eos" for both.
    The deltas concatenate to exactly result.text. None parameters take `limits`' defaults.
    The request is validated here, at call time (not on first iteration), so a server can
    refuse it before starting a streamed response.
    """
    vocab = model.cfg.vocab_size or 0
    if isinstance(prompt, str):
        prompt_ids = tokenizer.encode_prompt(prompt)
    elif isinstance(prompt, list):
        prompt_ids = check_prompt_ids(prompt, vocab)
    else:
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    params = sampling_params(limits, model.cfg.max_seq_len, len(prompt_ids), vocab_size=vocab,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, stop=stop, stop_ids=stop_ids, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, **adjust)
    return _decode(model, SequenceState(prompt_ids, params, tokenizer))


def _decode(model: Transformer, seq: SequenceState) -> Iterator[str | GenerationResult]:
    was_training = model.training
    model.eval()
    try:
        # inference_mode wraps each model step, not the whole loop: a `with` spanning the
        # yields would leave inference mode switched on in the caller's code between items.
        with torch.inference_mode():
            cache = model.new_cache(1, max_len=len(seq.prompt_ids) + seq.params.max_new_tokens)
            token = seq.sample(seq.prefill(model, cache))
        while True:
            delta, finish = seq.advance(token)
            if delta:
                yield delta
            if finish is not None:
                break
            with torch.inference_mode():
                token = seq.sample(seq.decode(model, cache))
        rest, result = seq.finish(finish)
        if rest:
            yield rest
        yield result
    finally:
        model.train(was_training)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], *, limits: GenerateConfig,
             max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
             stop_ids: list[int] | None = None, logprobs: int | None = None,
             prompt_logprobs: bool = False, **adjust: Any) -> GenerationResult:
    """Complete `prompt`: prefill once with a KV cache, then decode token by token until eos
    (or a stop id), a stop string (text cut before it), or max_new_tokens. None parameters
    take `limits`' defaults. `logprobs` (0-20): record each completion token's logprob and
    that many top alternatives (GenerationResult.logprobs); `prompt_logprobs`: the prompt's
    too. `adjust`: min_p, repetition_penalty, frequency_penalty, presence_penalty, logit_bias
    (`sampling_params`; applied by `sampling.penalize` and `sample_next`)."""
    result = None
    for item in stream(model, tokenizer, prompt, limits=limits, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                       stop_ids=stop_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **adjust):
        result = item
    assert isinstance(result, GenerationResult)
    return result


def generate_chat(model: Transformer, chat: ChatFormat, messages: list[dict[str, str]], *, limits: GenerateConfig,
                  **sampling: Any) -> GenerationResult:
    """The assistant's reply to `messages`, rendered with the model's chat template and
    stopped at its end-of-turn marker. `sampling`: the keyword arguments of `generate`."""
    return generate(model, chat.tokenizer, chat.encode_prompt(messages), limits=limits,
                    stop_ids=chat.stop_ids, **sampling)
