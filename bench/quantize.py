"""Weight-only quantized inference in Bastion: full precision vs int8 vs int4, side by side.

One run, one model: a random Llama-style model (default d_model 256 x 6 layers, 4k BPE
vocabulary trained on the Python standard library's source, tied embeddings: 5.8M
parameters) saved as a checkpoint, then quantized with `bastion quantize`'s code to int8
and int4 checkpoints. Each of the three is measured in its own process (so peak memory is
its own), in the order fp32, int8, int4:

  * checkpoint size: the bytes of model.safetensors
  * decode tokens/s of `generate()` (one stream, 1 thread, 128 new tokens, greedy; median of
    3 runs after a warm-up)
  * tokens/s of 16 concurrent requests in the engine (padded mode, 64 new tokens each)
  * peak memory: the process's peak RSS above its RSS after imports (torchao imported in
    every process, so all three start alike)
  * logit error against fp32 on 4 x 128 positions: relative ||q - f|| / ||f||, and top-1
    agreement (a random model's logits are near-ties: a pessimistic figure)

    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize.py            # ~2 min on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize.py --d-model 512 --layers 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memstat, bench_models

from bench_models import NoEos  # noqa: E402
MODES = ("fp32", "int8", "int4")


def build(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    import torch

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
    for mode in ("int8", "int4"):
        paths[mode] = quantize_checkpoint(paths["fp32"], work / mode, mode)
    return paths


def measure(path: Path, logits_out: Path, args: argparse.Namespace) -> dict:
    """One checkpoint, in this process: speed, peak memory, logits saved for the parent."""
    import safetensors.torch
    import torch

    from bastion.config.schema import GenerateConfig
    from bastion.infer import generate
    from bastion.infer.engine import Engine
    from bastion.infer.loading import load_for_inference
    from bastion.model.quantize import _torchao
    from memstat import reset_peak, status_bytes

    torch.set_num_threads(1)
    _torchao()  # every process pays torchao's import alike
    reset_peak()
    base = status_bytes("VmRSS")
    loaded = load_for_inference(path)
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
    engine = Engine(loaded.model, tok, limits, max_batch_size=16, max_queue=16, mode="padded", threads=1)
    ids = loaded.tokenizer.encode(prompt)
    with engine:
        start = time.perf_counter()
        handles = [engine.submit(ids, engine.params(len(ids), max_new_tokens=64, seed=i)) for i in range(16)]
        done = sum(len(h.result().token_ids) for h in handles)
        concurrent = done / (time.perf_counter() - start)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, loaded.config.model.vocab_size, (4, 128), generator=g)
    with torch.inference_mode():
        logits = loaded.model(x)[0]
    safetensors.torch.save_file({"logits": logits.contiguous()}, str(logits_out))
    return {"tok_s": statistics.median(rates), "tok_s_16": concurrent,
            "peak_bytes": status_bytes("VmHWM") - base, "size_bytes": (path / "model.safetensors").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # CHECKPOINT LOGITS_FILE: measure one
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), args)))
        return
    import safetensors.torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = build(work, args)
        results, logits = {}, {}
        for mode in MODES:
            out = work / f"{mode}.logits.safetensors"
            child = [sys.executable, __file__, "--child", str(paths[mode]), str(out), "--tokens", str(args.tokens)]
            run = subprocess.run(child, capture_output=True, text=True, check=True)
            results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            logits[mode] = safetensors.torch.load_file(str(out))["logits"]
    ref = logits["fp32"]
    print(f"model: d_model {args.d_model} x {args.layers} layers, vocab {args.vocab}; 1 thread")
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


if __name__ == "__main__":
    main()
