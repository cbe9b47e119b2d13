"""Structured output: the grammar library's cost, and constrained decoding against free decoding.

    OMP_NUM_THREADS=1 .venv/bin/python bench/structured.py [--vocab 8000] [--tokens 64]
    (outlines-core is compared when importable: pip install outlines-core==0.2.14)

1. Libraries, on one byte-level BPE tokenizer trained here on the Python standard library:
   for each schema, the time to compile it (llguidance: grammar + matcher; outlines-core:
   regex + token index) and the median time per token of computing the allowed tokens
   (llguidance: the bitmask unpacked to a bool vector, as decoding uses it; outlines-core:
   its list of ids) and advancing, along a path of randomly chosen allowed tokens.
2. Decoding, side by side in this process: `generate()` on a small model (d512 x 8) with and
   without a schema, same prompt and seeds, tokens/s and the ratio. The constrained run's
   extra work is the mask per token.
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.config.presets import model_config  # noqa: E402
from bastion.config.schema import GenerateConfig  # noqa: E402
from bastion.infer import generate  # noqa: E402
from bastion.infer.structured import Constraint, check_schema, compile_grammar, json_grammar  # noqa: E402
from bastion.model import Transformer  # noqa: E402
from bastion.tokenizer import BastionTokenizer  # noqa: E402

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                              "member": {"type": "boolean"}},
             "required": ["name", "age", "member"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"id": {"type": "integer"},
                                             "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                      "maxItems": 3}},
            "required": ["id", "tags"], "additionalProperties": False}},
        "kind": {"enum": ["a", "b", "c"]}}, "required": ["items", "kind"], "additionalProperties": False},
    "json_object": {"type": "object"},
}


def train_tokenizer(vocab: int) -> BastionTokenizer:
    files = sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))[:1500]
    texts = [Path(f).read_text(errors="ignore") for f in files]
    return BastionTokenizer.train(texts, vocab)


def random_path(allowed_of, advance, eos: int, steps: int, seed: int, as_list=list) -> tuple[list[float], int]:
    """Walk `steps` random allowed tokens: (seconds per mask+advance, tokens walked). The
    time is the library's mask in the form decoding uses it; `as_list` (untimed) turns it
    into ids to choose from."""
    rng, times, n = random.Random(seed), [], 0
    for _ in range(steps):
        t = time.perf_counter()
        mask = allowed_of()
        elapsed = time.perf_counter() - t
        allowed = as_list(mask)
        if not allowed:
            break
        token = rng.choice(allowed)
        if token == eos:
            break
        t = time.perf_counter()
        advance(token)
        times.append(elapsed + time.perf_counter() - t)
        n += 1
    return times, n


def bench_llguidance(tok: BastionTokenizer, schema: dict, steps: int) -> tuple[float, float]:
    vocab = tok.vocab_size
    compile_grammar(json_grammar('{"type": "string"}'), tok, vocab, [tok.eos_id])  # the tokenizer view, once
    t = time.perf_counter()
    grammar = compile_grammar(json_grammar(check_schema(schema)), tok, vocab, [tok.eos_id])
    c = Constraint(grammar, tok, vocab, frozenset({tok.eos_id}))
    compile_s = time.perf_counter() - t
    # Constraint.allowed: llguidance's bitmask unpacked to the bool vector the sampler masks with.
    times, _ = random_path(c.allowed, c.consume, tok.eos_id, steps, 0,
                           as_list=lambda mask: mask.nonzero().flatten().tolist())
    return compile_s, statistics.median(times)


def bench_outlines(tok: BastionTokenizer, schema: dict, steps: int) -> tuple[float, float] | None:
    try:
        import outlines_core as oc
    except ImportError:
        return None
    vocab: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        if i != tok.eos_id:
            piece = tok.decode([i]).encode()
            if piece:
                vocab.setdefault(piece, []).append(i)
    t = time.perf_counter()
    index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), oc.Vocabulary(tok.eos_id, vocab))
    guide = oc.Guide(index)
    compile_s = time.perf_counter() - t
    times, _ = random_path(guide.get_tokens, guide.advance, tok.eos_id, steps, 0)
    return compile_s, statistics.median(times)


def bench_decoding(tok: BastionTokenizer, tokens: int) -> None:
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=tok.vocab_size, d_model=512, n_layer=8, n_head=8,
                                     n_kv_head=8, max_seq_len=512, init_std=0.2)).eval()
    limits = GenerateConfig(max_new_tokens=tokens, max_new_tokens_ceiling=tokens, temperature=1.0, top_k=None)
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    grammar = compile_grammar(json_grammar(check_schema(schema)), tok, model.cfg.vocab_size, [tok.eos_id])
    ban_eos = model.output.register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([tok.eos_id]),
                                                                                  float("-inf")))
    rates: dict[str, list[float]] = {"free": [], "schema": []}
    for rep in range(5):
        for kind in ("free", "schema"):
            t = time.perf_counter()
            result = generate(model, tok, "def main():", limits=limits, seed=rep,
                              grammar=grammar if kind == "schema" else None)
            rates[kind].append(len(result.token_ids) / (time.perf_counter() - t))
    ban_eos.remove()
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["schema"])
    print(f"\ndecoding d512 x 8, {tokens} tokens, temperature 1 (median of 5, interleaved):")
    print(f"  free {free:.1f} tok/s, schema {constrained:.1f} tok/s, ratio {constrained / free:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=8000, help="tokenizer vocabulary size")
    parser.add_argument("--steps", type=int, default=200, help="tokens walked per schema")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per decoding run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = train_tokenizer(args.vocab)
    print(f"tokenizer: {tok.vocab_size} tokens")
    print(f"{'schema':12s} {'library':14s} {'compile ms':>11s} {'us / token':>11s}")
    for name, schema in SCHEMAS.items():
        for library, run in (("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
            got = run(tok, schema, args.steps)
            if got is None:
                print(f"{name:12s} {library:14s} {'(not installed)':>23s}")
                continue
            print(f"{name:12s} {library:14s} {got[0] * 1e3:11.1f} {got[1] * 1e6:11.1f}")
    bench_decoding(tok, args.tokens)


if __name__ == "__main__":
    main()
