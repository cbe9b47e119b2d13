"""Multi-LoRA serving speed: the engine's batched decode (default padded mode, 16 slots) over a
random model, with every request for the base vs requests spread over several adapters.

Cases, interleaved over rounds, reported as tokens/s and as a ratio to `plain`:

  plain      the model without adapters (what `bastion serve` runs with no serve.adapters)
  base-only  adapters installed, every request for the base (the layers skip the adapters)
  one        every request for the same adapter
  mixed      requests spread round-robin over the base and every adapter

Two measurements: `engine` (default; whole requests through the Engine: prefill, decode,
sampling, scheduling; medians of the rounds) and `--step` (one padded decode step of all 16
rows, the batched part alone; the fastest of many repetitions, which shared or noisy
machines need).

    python bench/multi_lora.py [--rounds 3] [--adapters 4] [--rank 16] [--targets wq,wk,wv,wo]
    python bench/multi_lora.py --step --rounds 40
    python bench/multi_lora.py --plain-only     # the plain case alone (to compare branches)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from bastion.config.schema import GenerateConfig, LoraConfig, ModelConfig
from bastion.infer.engine import Engine
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer
from bench_models import NoEos  # the tokenizer without eos: every request runs its budget

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 4, "def main():\n    return sum(range(10))\n",
         "Bastion trains small language models from raw text, safely and reproducibly."]


def model(args) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers, n_head=8, n_kv_head=8,
                      max_seq_len=256)
    return Transformer(cfg).eval()


def with_adapters(args) -> Transformer:
    from bastion.model.lora import apply_lora, lora_state_dict
    from bastion.model.multi_lora import ServedAdapter, install_adapters

    cfg = LoraConfig(enabled=True, rank=args.rank, alpha=2 * args.rank, target_modules=args.targets.split(","))
    adapters = []
    for i in range(args.adapters):
        m = model(args)
        apply_lora(m, cfg)
        g = torch.Generator().manual_seed(i)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lora_state_dict(m).items()}
        adapters.append(ServedAdapter(f"a{i}", cfg, tensors))
    served = model(args)
    install_adapters(served, adapters)
    return served


def tokens_per_second(net: Transformer, tok, args, adapters: list[str | None]) -> float:
    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0)
    prompts = [tok.encode(TEXTS[i % len(TEXTS)])[: 8 + i % 5] for i in range(args.requests)]
    engine = Engine(net, tok, limits, max_batch_size=args.requests, max_queue=args.requests, threads=args.threads)
    handles = [engine.submit(p, engine.params(len(p)), adapter=adapters[i % len(adapters)]) if adapters != [None]
               else engine.submit(p, engine.params(len(p))) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    with engine:
        results = [h.result(timeout=600) for h in handles]
    elapsed = time.perf_counter() - start
    return sum(len(r.token_ids) for r in results) / elapsed


def step_tokens_per_second(net: Transformer, args, adapters: list[str | None]) -> float:
    """16 rows, one padded decode step (the engine's shapes), the fastest of 10-step blocks."""
    rows = list(range(args.requests))
    cache = net.new_cache(args.requests, max_len=128)
    tokens, positions = [5] * args.requests, [10] * args.requests
    served = getattr(net, "served_adapters", None)
    indices = [0 if served is None else served.index(adapters[i % len(adapters)]) for i in rows]
    rows_context = served.rows(indices) if served is not None else contextlib.nullcontext()
    with torch.inference_mode(), rows_context:
        start = time.perf_counter()
        for _ in range(10):
            net.decode_step(tokens, cache, rows, positions, key_length=128)
    return 10 * args.requests / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="wq,wk,wv,wo")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain-only", action="store_true")
    parser.add_argument("--step", action="store_true", help="time one batched decode step, not whole requests")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = NoEos(BastionTokenizer.train(TEXTS * 8, vocab_size=512, min_frequency=1))
    args.vocab = tok.vocab_size
    plain = model(args)
    cases = {"plain": (plain, [None])}
    if not args.plain_only:
        served = with_adapters(args)
        names = [f"a{i}" for i in range(args.adapters)]
        cases |= {"base-only": (served, [None]), "one": (served, names[:1]), "mixed": (served, [None, *names])}
    runs: dict[str, list[float]] = {name: [] for name in cases}
    measure = (lambda net, adapters: step_tokens_per_second(net, args, adapters)) if args.step else \
        (lambda net, adapters: tokens_per_second(net, tok, args, adapters))
    measure(plain, [None])  # warm-up
    for _ in range(args.rounds):
        for name, (net, adapters) in cases.items():
            runs[name].append(measure(net, adapters))
    summary = max if args.step else statistics.median
    report = {name: summary(values) for name, values in runs.items()}
    for name, value in report.items():
        print(f"{name:10s} {value:8.1f} tokens/s   x{value / report['plain']:.2f} of plain")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens_per_s": report, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
