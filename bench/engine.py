"""The engine in-process, without HTTP: single-stream and batched decode speed, prefix-cache
time to first token, and a running stream's inter-token latency while a long prompt joins.

One model (a random Llama built here, d 256 x 4 layers by default, the shape bench/serve.py
uses), greedy, end of text disabled (every request runs to its budget). Every figure is a
ratio measured side by side in this one process, jobs alternating, medians of `--rounds`:
the machine is shared, so absolute numbers drift while ratios hold.

    python bench/engine.py
    git show <rev>:bastion/infer/engine.py > /tmp/old_engine.py
    python bench/engine.py --baseline /tmp/old_engine.py   # an older engine side by side
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import NoEos  # noqa: E402


def build(args: argparse.Namespace):
    import torch

    from bastion.config.schema import ModelConfig
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer
    from synthetic.chat import reverse_chat_records

    tok = BastionTokenizer.train([str(r) for r in reverse_chat_records(500, seed=1)], vocab_size=args.vocab,
                                 min_frequency=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=args.d_model, n_layer=args.layers,
                                    n_head=args.heads, n_kv_head=args.heads // 2, max_seq_len=args.context)).eval()
    return model, NoEos(tok)


def engine_class(path: str | None):
    if path is None:
        from bastion.infer.engine import Engine
        return Engine
    spec = importlib.util.spec_from_file_location("baseline_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Engine


def run_all(engine, prompts: list[list[int]], tokens: int) -> float:
    """Submit every prompt at once; completion tokens per second until the last ends."""
    start = time.perf_counter()
    handles = [engine.submit(p, engine.params(len(p), max_new_tokens=tokens)) for p in prompts]
    produced = sum(len(h.result(timeout=600).token_ids) for h in handles)
    return produced / (time.perf_counter() - start)


def median_rates(jobs: dict, rounds: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(rounds):
        for name, job in jobs.items():
            rates[name].append(job())
    return {name: statistics.median(r) for name, r in rates.items()}


def decode_speed(model, tok, args, engines: dict) -> None:
    from bastion.config.schema import GenerateConfig
    from bastion.infer.generate import generate

    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0)
    prompt = tok.encode("reverse: a b c d e f g h")

    def run_generate() -> float:
        start = time.perf_counter()
        return len(generate(model, tok, prompt, limits=limits).token_ids) / (time.perf_counter() - start)

    single = {"bastion generate()": run_generate}
    single.update({name: (lambda e=e: run_all(e, [prompt], args.tokens)) for name, e in engines.items()})
    rates = median_rates(single, args.rounds)
    base = rates["bastion generate()"]
    print(f"\nsingle stream, {args.tokens} tokens (median of {args.rounds})")
    for name, rate in rates.items():
        print(f"  {name:<34} {rate:8.1f} tok/s  {rate / base:5.2f}x generate()")

    prompts = [tok.encode(f"reverse: {i} a b c") for i in range(args.slots)]
    batched = {name: (lambda e=e: run_all(e, prompts, args.tokens)) for name, e in engines.items()}
    rates_n = median_rates(batched, args.rounds)
    print(f"\n{args.slots} streams at once, {args.tokens} tokens each (median of {args.rounds})")
    for name, rate in rates_n.items():
        print(f"  {name:<34} {rate:8.1f} tok/s  {rate / base:5.2f}x one generate()")


def shared_prefix(tok, tokens: int) -> list[int]:
    """A 'system prompt' of about `tokens` tokens."""
    words = "You are a careful assistant for the reverse task. Answer with the words reversed. ".split()
    ids: list[int] = []
    i = 0
    while len(ids) < tokens:
        ids += tok.encode(words[i % len(words)] + " ")
        i += 1
    return ids[:tokens]


def prefix_cache_ttft(model, tok, args, engine_cls) -> None:
    """Time to first token of prompts = one long shared prefix + a short question: cold (a
    namespace never seen: no hit) vs warm (the prefix's blocks cached), alternating."""
    from bastion.config.schema import GenerateConfig

    limits = GenerateConfig(max_new_tokens=1, max_new_tokens_ceiling=args.tokens, temperature=0.0,
                            max_prompt_tokens=args.context - args.tokens)
    engine = engine_cls(model, tok, limits, max_batch_size=args.slots, threads=args.threads,
                        prefix_cache_blocks=256)
    system = shared_prefix(tok, args.prefix)
    counter = iter(range(10**9))

    def ttft(namespace: str) -> float:
        prompt = system + tok.encode(f" question {next(counter)}: a b c")
        start = time.perf_counter()
        engine.submit(prompt, engine.params(len(prompt), max_new_tokens=1), cache_namespace=namespace).result()
        return 1 / (time.perf_counter() - start)  # a rate, so median_rates applies

    with engine:
        rates = median_rates({"cold (no hit)": lambda: ttft(f"cold-{next(counter)}"),
                              "warm (prefix cached)": lambda: ttft("warm")}, args.rounds)
        stats = engine.prefix_cache_stats
    cold, warm = 1 / rates["cold (no hit)"], 1 / rates["warm (prefix cached)"]
    print(f"\nprefix cache: {args.prefix}-token shared prefix + a short question, max_new_tokens=1 "
          f"(median of {args.rounds})")
    print(f"  time to first token: cold {cold * 1e3:.1f} ms, warm {warm * 1e3:.1f} ms: {cold / warm:.2f}x faster")
    print(f"  counters: queried {stats['queried_tokens']} tokens, hit {stats['hit_tokens']} "
          f"({stats['hit_tokens'] / max(1, stats['queried_tokens']):.0%})")


def stall_while_joining(model, tok, args, engine_cls, step_tokens: int) -> tuple[float, float]:
    """One stream decoding; after 20 of its tokens a long prompt joins. -> (median gap
    between the stream's tokens before the join, longest gap after it), seconds."""
    from bastion.config.schema import GenerateConfig

    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0,
                            max_prompt_tokens=args.context - args.tokens)
    kw = {} if step_tokens is None else dict(prefill_step_tokens=step_tokens)
    engine = engine_cls(model, tok, limits, max_batch_size=args.slots, threads=args.threads, **kw)
    stream_prompt = tok.encode("reverse: a b c")
    long_prompt = shared_prefix(tok, args.context - args.tokens)
    with engine:
        handle = engine.submit(stream_prompt, engine.params(len(stream_prompt)))
        times, joined = [], None
        for item in handle:
            times.append(time.perf_counter())
            if len(times) == 20:
                joined = engine.submit(long_prompt, engine.params(len(long_prompt), max_new_tokens=1))
        joined.result()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps[:18]), max(gaps[18:30])  # the join and the steps right after it


def chunked_prefill_stall(model, tok, args, engine_cls, baseline_cls) -> None:
    runs = {"whole prompt in one step": (engine_cls, 10**6),  # as the padded mode prefilled before
            f"chunked, {args.step_tokens} tokens per step": (engine_cls, args.step_tokens)}
    if baseline_cls is not None:
        runs["baseline engine"] = (baseline_cls, None)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (cls, step) in runs.items():
            results[name].append(stall_while_joining(model, tok, args, cls, step))
    print(f"\na running stream while a {args.context - args.tokens}-token prompt joins (median of {args.rounds})")
    for name, pairs in results.items():
        usual = statistics.median(p[0] for p in pairs)
        worst = statistics.median(p[1] for p in pairs)
        print(f"  {name:<34} usual gap {usual * 1e3:6.1f} ms, longest gap after the join {worst * 1e3:7.1f} ms "
              f"({worst / usual:5.1f}x usual)")


def kv_memory(model, tok, args, engines: dict) -> None:
    """Keys/values held while idle and while `args.slots` requests of a short prompt run."""
    prompts = [tok.encode(f"reverse: {i} a b c") for i in range(args.slots)]
    print(f"\nKV cache held (MiB): idle / while {args.slots} short-prompt requests of {args.tokens} tokens run")
    for name, engine in engines.items():
        engine.start()
        try:
            def held() -> int:
                if hasattr(engine, "kv_cache_bytes"):
                    return engine.kv_cache_bytes
                return sum(t.numel() * t.element_size() for t in (*engine._cache.k, *engine._cache.v))
            idle = held()
            handles = [engine.submit(p, engine.params(len(p), max_new_tokens=args.tokens)) for p in prompts]
            next(iter(handles[-1]))  # the last one is decoding: all are running
            busy = held()
            for h in handles:
                h.result(timeout=600)
        finally:
            engine.shutdown()
        print(f"  {name:<34} {idle / 2**20:8.2f} / {busy / 2**20:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--slots", type=int, default=16, help="engine batch size, and the streams of the batched run")
    parser.add_argument("--threads", type=int, default=1, help="engine thread's torch threads (serve.threads)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="an older engine.py to run side by side")
    parser.add_argument("--prefix", type=int, default=160, help="shared prefix tokens (prefix-cache section)")
    parser.add_argument("--step-tokens", type=int, default=64, help="prefill_step_tokens of the chunked run")
    parser.add_argument("--only", choices=["decode", "memory", "prefix", "stall"], default=None)
    args = parser.parse_args()
    import torch

    from bastion.config.schema import GenerateConfig

    torch.set_num_threads(args.threads)
    model, tok = build(args)
    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0,
                            max_prompt_tokens=args.context - args.tokens)
    kw = dict(max_batch_size=args.slots, max_queue=4 * args.slots, threads=args.threads)
    engines = {"engine padded (this tree)": engine_class(None)(model, tok, limits, mode="padded", **kw)}
    if args.baseline:
        engines["engine padded (baseline)"] = engine_class(args.baseline)(model, tok, limits, mode="padded", **kw)
    engines["engine dynamic (this tree)"] = engine_class(None)(model, tok, limits, mode="dynamic", **kw)
    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab} "
          f"context={args.context}; engine slots {args.slots}, threads {args.threads}")
    if args.only in (None, "decode"):
        for e in engines.values():
            e.start()
        try:
            decode_speed(model, tok, args, engines)
        finally:
            for e in engines.values():
                e.shutdown()
    if args.only in (None, "memory"):
        memory = {"engine padded (this tree)": engine_class(None)(model, tok, limits, mode="padded", **kw)}
        if args.baseline:
            memory["engine padded (baseline)"] = engine_class(args.baseline)(model, tok, limits, mode="padded", **kw)
        kv_memory(model, tok, args, memory)
    if args.only in (None, "prefix"):
        prefix_cache_ttft(model, tok, args, engine_class(None))
    if args.only in (None, "stall"):
        chunked_prefill_stall(model, tok, args, engine_class(None),
                              engine_class(args.baseline) if args.baseline else None)


if __name__ == "__main__":
    main()
