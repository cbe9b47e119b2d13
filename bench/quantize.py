"""Quantized models in Bastion, side by side: fp32 vs bf16 vs int8 vs int4 (speed, size,
memory, perplexity), and QLoRA vs LoRA (bench/qlora.py).

Speed: a random Llama-style model (default d_model 1024 x 12 layers, 8 heads / 4 kv, 4k BPE
vocabulary trained on the Python standard library's source, tied embeddings: 143M
parameters -- the issue's llama.cpp anchor shape) saved as a checkpoint, cast to a bf16
checkpoint, and quantized with `bastion quantize`'s code to int8 and int4 checkpoints. Each
is measured in its own process (so peak memory is its own), `--threads` threads:

  * checkpoint size: the bytes of model.safetensors
  * decode tokens/s of `generate()` (one stream, `--tokens` new tokens, greedy; median of 3
    runs after a warm-up)
  * tokens/s of 16 concurrent requests in the engine (padded mode, 32 new tokens each)
  * peak memory: the process's peak RSS above its RSS after imports (torchao imported in
    every process, so all start alike)
  * logit error against fp32 on 4 x 128 positions: relative ||q - f|| / ||f||, and top-1
    agreement (a random model's logits are near-ties: a pessimistic figure)

Quality: a small model (d_model 256 x 4) trained for `--train-steps` steps on the standard
library's source, then `bastion eval perplexity` on held-out source files in every format
(bastion/eval/perplexity.py: fp32, bf16, int8, int4 and the GGUF formats' stored values).

    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize.py            # ~8 min on 2 CPU cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/quantize.py --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize.py --d-model 256 --layers 6 --skip-qlora
    python bench/quantize.py --device cuda --skip-quality --skip-qlora    # peak = CUDA memory
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memstat, bench_models

from bench_models import NoEos  # noqa: E402
MODES = ("fp32", "bf16", "int8", "int4")


def build(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from bastion.infer.quantize import quantize_checkpoint
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer
    from llama_cpp_gguf_check import stdlib_text

    tok = BastionTokenizer.train(stdlib_text(1_000_000), vocab_size=args.vocab)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": args.d_model, "n_layer": args.layers,
                                  "n_head": 8, "n_kv_head": 4, "max_seq_len": 512},
                        "train": {"seq_len": 128}, "generate": {"max_new_tokens_ceiling": 512}})
    torch.manual_seed(0)
    net = Transformer(cfg.model).eval()
    print(f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters")
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 0}, config_yaml=to_yaml(cfg),
                      tokenizer_json=tok.to_json_str())
    paths = {"fp32": save_checkpoint(work / "fp32", 0, ckpt)}
    # Bastion's checkpoints hold float32 weights (bf16 training keeps float32 masters): the
    # bf16 row loads the fp32 checkpoint and casts it; its size is a bf16 safetensors file's.
    paths["bf16"] = paths["fp32"]
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in net.state_dict().items() if k != "output.weight"},
              str(work / "bf16.safetensors"))
    for mode in ("int8", "int4"):
        paths[mode] = quantize_checkpoint(paths["fp32"], work / mode, mode)
    return paths


def measure(mode: str, path: Path, logits_out: Path, args: argparse.Namespace) -> dict:
    """One checkpoint, in this process: speed, peak memory, logits saved for the parent.
    bf16: Bastion loads weights as float32 for inference, so the model is cast back."""
    import safetensors.torch
    import torch

    from bastion.config.schema import GenerateConfig
    from bastion.infer import generate
    from bastion.infer.engine import Engine
    from bastion.infer.loading import load_for_inference
    from bastion.model.quantize import _torchao
    from memstat import reset_peak, status_bytes

    torch.set_num_threads(args.threads)
    _torchao()  # every process pays torchao's import alike
    reset_peak()
    base = status_bytes("VmRSS")
    cuda = args.device.startswith("cuda")
    loaded = load_for_inference(path, device=args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "bf16":
        loaded.model.to(torch.bfloat16)
    tok = NoEos(loaded.tokenizer)
    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=512, temperature=0.0)
    prompt = "def main():\n    "
    rates = []
    for run in range(4):
        start = time.perf_counter()
        result = generate(loaded.model, tok, prompt, limits=limits)
        seconds = time.perf_counter() - start
        if run:  # the first is a warm-up
            rates.append(len(result.token_ids) / seconds)
    engine = Engine(loaded.model, tok, limits, max_batch_size=16, max_queue=16, mode="padded", threads=args.threads)
    ids = loaded.tokenizer.encode(prompt)
    with engine:
        start = time.perf_counter()
        handles = [engine.submit(ids, engine.params(len(ids), max_new_tokens=32, seed=i)) for i in range(16)]
        done = sum(len(h.result().token_ids) for h in handles)
        concurrent = done / (time.perf_counter() - start)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, loaded.config.model.vocab_size, (4, 128), generator=g).to(args.device)
    with torch.inference_mode():
        logits = loaded.model(x)[0].float().cpu()
    safetensors.torch.save_file({"logits": logits.contiguous()}, str(logits_out))
    return {"tok_s": statistics.median(rates), "tok_s_16": concurrent,
            # CUDA: the device's peak allocation after loading (weights, KV cache, activations)
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM") - base,
            "size_bytes": (path.parent.parent / "bf16.safetensors" if mode == "bf16" else path / "model.safetensors").stat().st_size}


def quality(work: Path, args: argparse.Namespace) -> dict:
    """Train a small model on the stdlib's source (files before the held-out ones), then
    `eval_perplexity` in every format on held-out files."""
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from bastion.eval.perplexity import FORMATS, eval_perplexity
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer
    from llama_cpp_gguf_check import stdlib_text

    torch.set_num_threads(args.threads)
    texts = stdlib_text(3_000_000)
    train_texts, held_out = texts[:-12], texts[-12:]
    tok = BastionTokenizer.train(train_texts, vocab_size=args.vocab)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": 256, "n_layer": 4, "n_head": 8,
                                  "n_kv_head": 4, "max_seq_len": 256}, "train": {"seq_len": 128}})
    data = torch.tensor([i for t in train_texts for i in tok.encode(t) + [tok.eos_id]])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.train_steps):
        for group in opt.param_groups:  # linear warm-up 50 steps, then cosine to 10%
            warm = min(1.0, (step + 1) / 50)
            group["lr"] = 2e-3 * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.train_steps)))
        rows = torch.randint(0, len(data) - 129, (16,), generator=g)
        batch = torch.stack([data[r:r + 129] for r in rows])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_seconds = time.perf_counter() - start
    ckpt = Checkpoint(model=model.state_dict(), trainer_state={"step": args.train_steps}, config_yaml=to_yaml(cfg),
                      tokenizer_json=tok.to_json_str())
    path = save_checkpoint(work / "trained", args.train_steps, ckpt)
    text = work / "held_out.txt"
    text.write_text("\n".join(held_out))
    result = eval_perplexity(path, text=text, formats=FORMATS, roots=[str(work)], seq_len=256, max_tokens=32_768)
    return {"train_loss": loss.item(), "train_seconds": train_seconds, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per timed generate()")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: torchao's CUDA linears (speed part only)")
    parser.add_argument("--train-steps", type=int, default=400, help="steps of the perplexity model")
    parser.add_argument("--skip-qlora", action="store_true", help="leave out bench/qlora.py's run")
    parser.add_argument("--skip-quality", action="store_true", help="leave out the perplexity model")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODE CHECKPOINT LOGITS_FILE: measure one
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), Path(args.child[2]), args)))
        return
    import safetensors.torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = build(work, args)
        results, logits = {}, {}
        for mode in MODES:
            out = work / f"{mode}.logits.safetensors"
            child = [sys.executable, __file__, "--child", mode, str(paths[mode]), str(out), "--tokens",
                     str(args.tokens), "--threads", str(args.threads), "--device", args.device]
            run = subprocess.run(child, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{mode} failed:\n{run.stderr[-3000:]}")
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            logits[mode] = safetensors.torch.load_file(str(out))["logits"]
        ppl = None if args.skip_quality else quality(work, args)
    ref = logits["fp32"]
    print(f"speed: d_model {args.d_model} x {args.layers} layers, vocab {args.vocab}; {args.device}, "
          f"{args.threads} thread(s)")
    print(f"{'':6} {'size MB':>8} {'x':>6} {'tok/s':>7} {'x':>6} {'16-conc tok/s':>14} {'x':>6} "
          f"{'peak MB':>8} {'x':>6} {'rel logit err':>14} {'top-1':>6}")
    base = results["fp32"]
    for mode in MODES:
        r = results[mode]
        err = ((logits[mode] - ref).norm() / ref.norm()).item()
        top1 = (logits[mode].argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{mode:6} {r['size_bytes'] / 1e6:8.2f} {r['size_bytes'] / base['size_bytes']:6.2f} "
              f"{r['tok_s']:7.1f} {r['tok_s'] / base['tok_s']:6.2f} {r['tok_s_16']:14.1f} "
              f"{r['tok_s_16'] / base['tok_s_16']:6.2f} {r['peak_bytes'] / 1e6:8.1f} "
              f"{r['peak_bytes'] / base['peak_bytes']:6.2f} {err:14.2e} {top1:6.1%}")
    if ppl is not None:
        print(f"\nquality: d_model 256 x 4 trained {args.train_steps} steps ({ppl['train_seconds']:.0f} s, last loss "
              f"{ppl['train_loss']:.2f}); perplexity on {ppl['tokens']:,} held-out stdlib tokens, windows of "
              f"{ppl['seq_len']}")
        for name, row in ppl["formats"].items():
            print(f"{name:10} {row['perplexity']:9.3f} {row['change_pct']:+7.2f}%")
    if not args.skip_qlora:
        print("\nQLoRA vs LoRA (bench/qlora.py):", flush=True)
        qlora = [sys.executable, str(Path(__file__).with_name("qlora.py")), "--threads", str(args.threads)]
        subprocess.run(qlora, check=True)


if __name__ == "__main__":
    main()
