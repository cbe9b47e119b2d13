"""Serving: single-stream speed vs transformers' generate(), and the HTTP server under load.

One run, one model (a Llama built here; the same weights go to transformers through
`bastion export hf`), greedy decoding of exactly `--tokens` new tokens per request (end of
text is disabled on both sides, as `min_new_tokens` does for transformers):

  1. single stream: transformers `generate()` (KV cache, SDPA) vs Bastion's `generate()`
     and the engine (one request, "padded" and "rowwise" modes), alternating, medians;
  2. the real server (uvicorn on loopback, the engine behind it) with 1, 4, 16 and 64
     concurrent HTTP clients: completion tokens/s, and p50 / p99 request latency,
     against the single-stream figure;
  3. a soak: many requests, the process's RSS sampled as they go (must stay flat).

    python bench/serve.py                 # CPU defaults, ~3 min on 2 cores
    python bench/serve.py --device cuda --d-model 1024 --layers 16 --tokens 128
"""
from __future__ import annotations

import argparse
import sys
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import NoEos  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(work: Path, args: argparse.Namespace) -> Path:
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from synthetic.chat import reverse_chat_records
    from bastion.interop.hf import export_hf
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer

    texts = [str(r) for r in reverse_chat_records(500, seed=1)]
    tok = BastionTokenizer.train(texts, vocab_size=args.vocab, min_frequency=1)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": args.d_model, "n_layer": args.layers,
                                  "n_head": args.heads, "n_kv_head": args.heads // 2, "max_seq_len": args.context},
                        "train": {"seq_len": min(256, args.context)}})
    torch.manual_seed(0)
    save_checkpoint(work / "model", 0, Checkpoint(model=Transformer(cfg.model).state_dict(), config_yaml=to_yaml(cfg),
                                                  tokenizer_json=tok.to_json_str(), trainer_state={"step": 0}))
    export_hf(work / "model", work / "hf")
    return work / "model"


def single_stream(ckpt: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from bastion.config.schema import GenerateConfig
    from bastion.infer.engine import Engine
    from bastion.infer.generate import generate
    from bastion.infer.loading import load_for_inference

    loaded = load_for_inference(ckpt, device=args.device)
    tok = NoEos(loaded.tokenizer)
    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0)
    prompt = "reverse: a b c d e f g h"
    ids = loaded.tokenizer.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa").to(args.device).eval()
    hf_ids = torch.tensor([ids], device=args.device)
    engines = {mode: Engine(loaded.model, tok, limits, max_batch_size=args.slots, max_queue=0, mode=mode)
               for mode in ("padded", "rowwise")}
    for e in engines.values():
        e.start()

    def run_hf() -> int:
        with torch.inference_mode():
            out = hf.generate(hf_ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                              use_cache=True, pad_token_id=0)
        return out.shape[1] - len(ids)

    def run_ours() -> int:
        return len(generate(loaded.model, tok, ids, limits=limits).token_ids)

    def run_engine(mode: str):
        def run() -> int:
            return len(engines[mode].submit(ids, engines[mode].params(len(ids))).result(timeout=600).token_ids)
        return run

    jobs = {"transformers generate()": run_hf, "bastion generate()": run_ours,
            "bastion engine (padded)": run_engine("padded"), "bastion engine (rowwise)": run_engine("rowwise")}
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(args.rounds):
        for name, job in jobs.items():
            t = time.perf_counter()
            n = job()
            rates[name].append(n / (time.perf_counter() - t))
    for e in engines.values():
        e.shutdown()
    return {name: statistics.median(r) for name, r in rates.items()}


def start_server(ckpt: Path, args: argparse.Namespace):
    import uvicorn

    from bastion.config import build_config
    from bastion.infer.engine import Engine
    from bastion.serve.app import create_app
    from bastion.serve.server import build_state

    with socket_port() as port:
        pass
    config = build_config({"serve": {"port": port, "max_concurrency": args.slots, "max_queue": 1024,
                                     "rate_limit": {"requests_per_minute": None, "tokens_per_minute": None},
                                     "access_log": str(ckpt.parent / "access.log"), "request_timeout_s": 3600},
                           "generate": {"max_new_tokens": args.tokens, "max_new_tokens_ceiling": args.tokens}})
    state = build_state(ckpt, config, device=args.device, environ={})
    state.engine = Engine(state.loaded.model, NoEos(state.loaded.tokenizer), config.generate,
                          max_batch_size=args.slots, max_queue=1024)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", state.model_name, server, thread


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.s.close()


async def load(url: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    produced = 0
    todo = list(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal produced
        while todo:
            i = todo.pop()
            t = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": model, "prompt": f"reverse: {i % 10} a b",
                                                           "max_tokens": tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            produced += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"tokens_per_s": produced / wall, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], "requests": len(latencies)}


def rss_mib() -> float:
    from memstat import status_bytes  # bench/ is on sys.path when this runs as a script

    return status_bytes("VmRSS") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--slots", type=int, default=16, help="engine batch size (serve.max_concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=int, default=400, help="requests in the memory soak")
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ckpt = build(work, args)
    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab}, "
          f"{args.tokens} new tokens per request, engine slots {args.slots}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    single = single_stream(ckpt, work, args)
    base = single["transformers generate()"]
    print(f"\nsingle stream (median of {args.rounds})")
    for name, rate in single.items():
        print(f"  {name:<28} {rate:8.1f} tok/s  {rate / base:5.2f}x")

    url, model, server, thread = start_server(ckpt, args)
    try:
        print("\nHTTP server, concurrent clients (greedy, completion tokens/s)")
        one = None
        for clients in (1, 4, 16, 64):
            r = asyncio.run(load(url, model, clients, max(8, 2 * clients), args.tokens))
            one = one or r["tokens_per_s"]
            print(f"  {clients:>3} clients: {r['tokens_per_s']:8.1f} tok/s ({r['tokens_per_s'] / one:5.2f}x 1 client), "
                  f"p50 {r['p50']:.2f}s p99 {r['p99']:.2f}s over {r['requests']} requests")
        samples = []
        for chunk in range(4):
            asyncio.run(load(url, model, 16, args.soak // 4, 8))
            samples.append(rss_mib())
        print(f"\nsoak: {args.soak} requests, RSS after each quarter: " + ", ".join(f"{s:.0f}" for s in samples)
              + f" MiB (growth over the last three quarters {samples[-1] - samples[0]:+.0f} MiB)")
    finally:
        server.should_exit = True
        thread.join(timeout=60)


if __name__ == "__main__":
    main()
