"""Structured output: decoding constrained by a grammar, so the text always parses.

A request's constraint is an llguidance grammar (a JSON schema, "any JSON object", or the
tool-call grammar built in `bastion/tokenizer/tools.py`), compiled and checked once against
the tokenizer (`compile_grammar`, cached), then carried in `SamplingParams.grammar` as
llguidance's own serialized form. Each sequence gets a `Constraint` (an `LLMatcher`): before
every sample it computes which token ids may come next (a bitmask over the vocabulary) and
the other logits become -inf; every sampled token is then consumed by the matcher. The end
ids (eos, the chat template's end of turn) are allowed only where the grammar may end, and
once nothing can follow they are the only choice.

Why llguidance (measured in bench/structured.py, docs/benchmarks.md): no precomputation
(a schema compiles in about a millisecond, against 45 ms to 13 s for outlines-core's index,
whose `{"type": "object"}` alone took 12.7 s on an 8k vocabulary), a mask in tens of
microseconds per token, arbitrary JSON schemas and Lark grammars (tools need text-or-calls),
no dependencies; xgrammar needs triton and transformers at install time. Masks are computed
per sequence, so batching changes nothing: a request's tokens do not depend on its batch.

Everything here is bounded before llguidance sees it: schema bytes and nesting depth
(`check_schema`), and the parser's own limits (`PARSER_LIMITS`, llguidance's `LLParserLimits`:
grammar size, lexer states, work per token). A schema llguidance refuses is a
GrammarError naming what it said, which the server returns as a 400.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import torch

from bastion.errors import GenerationLimitError

MAX_SCHEMA_BYTES = 65_536  # hard caps; ServeConfig.max_schema_bytes / max_schema_depth are the configured ones
MAX_SCHEMA_DEPTH = 64


class GrammarError(GenerationLimitError):
    """A schema or grammar this server cannot constrain decoding with (a 400 at the server)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a declared dependency: only a broken install lacks it
        raise GrammarError(f"structured output needs the llguidance package ({exc})") from None
    return llguidance


def parser_limits() -> Any:
    """llguidance's per-grammar limits, stated here rather than inherited: they bound the
    compile and every token's mask (the defaults of llguidance 1.9, tightened where a
    request-sized grammar never needs more)."""
    llg = _llguidance()
    return llg.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                              step_max_items=50_000, max_lexer_states=100_000, max_grammar_size=200_000)


def check_schema(schema: Any, *, max_bytes: int = MAX_SCHEMA_BYTES, max_depth: int = MAX_SCHEMA_DEPTH,
                 where: str = "schema") -> str:
    """A JSON schema (a dict) within the size and depth bounds -> its compact JSON text.
    GrammarError naming `where` otherwise. Walked with a stack: depth is the client's choice."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON object, got {type(schema).__name__}")
    if "x-guidance" in schema:  # llguidance's own options (whitespace pattern...) are the server's to set
        raise GrammarError(f"{where}: the x-guidance key is not accepted")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise GrammarError(f"{where} is nested more than {max_depth} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN / Infinity: Python's JSON reader accepts them, JSON (and a schema) has none
        raise GrammarError(f"{where} contains a non-finite number (NaN or Infinity), which JSON does not allow") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise GrammarError(f"{where} is {size} bytes, over this server's limit of {max_bytes}")
    return text


# JSON as json.dumps writes it (the form models see most), and no other whitespace: free
# whitespace lets a sampler wander in newlines and tabs until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(schema_text: str | None) -> str:
    """The llguidance grammar for JSON text matching `schema_text` (None: any JSON object,
    OpenAI's `json_object`), written with JSON_OPTIONS."""
    llg = _llguidance()
    schema = '{"type":"object"}' if schema_text is None else schema_text
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(f"schema: {exc}") from None


def lark_grammar(lark: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark)


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Any, vocab_size: int, end_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a `tokenizers`-backed tokenizer (about 0.1 s to build: cached),
    with `end_ids` as its end-of-sequence tokens and the model's vocabulary size (rows past
    the tokenizer's own ids are never allowed)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise GrammarError("structured output needs a Hugging Face `tokenizers` tokenizer")
    return _llguidance().LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(end_ids))


@functools.lru_cache(maxsize=256)
def _checked(grammar: str, tokenizer: Any, vocab_size: int, end_ids: tuple[int, ...]) -> str:
    llg = _llguidance()
    lt = _ll_tokenizer(tokenizer, vocab_size, end_ids)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lt, limits=parser_limits())
    if is_error:
        reason = " ".join((messages[0] if messages else "invalid").split())[:500]  # one line, bounded
        raise GrammarError(f"the grammar library refused this schema: {reason}")
    # Valid but empty (a $ref loop with nothing under it): no first token would be allowed,
    # and the request would fail inside the engine. One matcher and one mask find that here.
    first = Constraint(grammar, tokenizer, vocab_size, frozenset(end_ids), check_first=False)
    if first.matcher.is_error() or not first.any_allowed():
        raise GrammarError("the schema matches no JSON value (a $ref loop, or contradictory keywords)")
    return grammar


def compile_grammar(grammar: str, tokenizer: Any, vocab_size: int, end_ids: list[int] | tuple[int, ...]) -> str:
    """Check `grammar` against the tokenizer and limits (cached: the same schema again costs
    nothing) -> the grammar to put in SamplingParams.grammar. GrammarError if refused. The
    first call for a tokenizer builds its llguidance view (~0.1 s): call it off the event loop."""
    return _checked(grammar, tokenizer, int(vocab_size), tuple(sorted(set(end_ids))))


class Constraint:
    """One sequence's grammar state: `mask` the logits before sampling, `consume` each
    sampled token. Built on the engine thread at the sequence's first sample."""

    def __init__(self, grammar: str, tokenizer: Any, vocab_size: int, end_ids: frozenset[int], *,
                 check_first: bool = True):
        llg = _llguidance()
        self.vocab_size = vocab_size
        lt = _ll_tokenizer(tokenizer, vocab_size, tuple(sorted(end_ids)))
        self.matcher = llg.LLMatcher(lt, grammar, log_level=0, limits=parser_limits())
        if check_first:
            self._check()
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"grammar: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor:
        """The ids that may come next, as a bool vector [V] (CPU)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        # Bit j of word i is id 32 i + j (little-endian words): numpy unpacks that in ~10 us
        # for 32k ids, where shifting in torch took ~125 us (bench/structured.py).
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def any_allowed(self) -> bool:
        """Whether some token may come next (without raising on a matcher error)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return not self.matcher.is_error() and bool(self._bits.any())

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> a float32 copy with every id the grammar forbids at -inf."""
        allowed = self.allowed().to(logits.device)
        return logits.float().masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        """A sampled token (never an end id: the sequence ends there)."""
        if not self.matcher.consume_token(token):
            self._check()
            raise GrammarError(f"grammar: token {token} was not allowed")
