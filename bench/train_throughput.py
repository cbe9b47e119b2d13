"""Training throughput: `bastion train` vs Hugging Face transformers' LlamaForCausalLM.

Both train the same architecture (Llama: RMSNorm, RoPE, SwiGLU, SDPA attention) on the same
batches of the same prepared dataset, with the same AdamW settings, in one process,
interleaved round by round so machine noise hits both alike. Ours is the real training
loop (`bastion.train.train`, tokens/s as it logs them); theirs is a plain PyTorch loop.

    python bench/train_throughput.py                       # CPU defaults
    python bench/train_throughput.py --device cuda --preset base --model-vocab 50304 \
        --seq-len 1024 --batch-size 16 --dtype bfloat16          # GPT-2 small class (~124M), MFU
    bash bench/gpu_check.sh                                   # all the GPU runs, as one prepared script

--model-vocab sizes the embedding and head beyond the small tokenizer trained here (the
extra ids are simply never seen), so the model has GPT-2 small's shape and FLOPs and the
MFU compares with the published anchors (llm.c, nanoGPT) for that model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bastion.config import build_config
from bastion.data import prepare_dataset
from bastion.data.shards import TokenShards
from bastion.model import Transformer
from bastion.train import train
from bastion.data.batches import BlockSampler
from bastion.train.metrics import read_metrics

from bastion.train.metrics import PEAK_BF16_FLOPS as PEAK_BF16  # noqa: E402 - MFU's denominators


def prepare(workdir: Path, vocab_size: int) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    cfg = build_config({"data": {
        "sources": [str(stdlib / p) for p in ("email/*.py", "http/*.py", "json/*.py", "asyncio/*.py", "logging/*.py")],
        "text_suffixes": [".py"], "output_dir": str(workdir / "data"), "val_fraction": 0.0,
        "allowed_roots": [str(stdlib), str(workdir)],
        "tokenizer": {"vocab_size": vocab_size},
    }})
    prepare_dataset(cfg.data)
    return workdir / "data"


def bench_config(args, data_dir: Path, out_dir: Path, steps: int):
    return build_config({
        "model": {"preset": args.preset, "max_seq_len": max(args.seq_len, 128),
                  **({"vocab_size": args.model_vocab} if args.model_vocab else {})},
        "train": {"data_dir": str(data_dir), "out_dir": str(out_dir), "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "max_steps": steps, "lr": 1e-3, "warmup_steps": 2,
                  "eval_every": 10**8, "log_every": 1, "dtype": args.dtype, "device": args.device,
                  "compile": args.compile, "seed": 0},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1, "save_optimizer": False},
    }, source="bench config")


def run_bastion(args, data_dir: Path, workdir: Path, round_no: int) -> float:
    out = workdir / f"bastion-{round_no}"
    train(bench_config(args, data_dir, out, args.warmup + args.steps), quiet=True)
    rates = [r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return statistics.median(rates[args.warmup:])


def hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_cfg)


def run_hf(args, data_dir: Path, round_no: int) -> float:
    """A plain loop: same batches, AdamW settings, clipping, autocast and loss as ours."""
    cfg = bench_config(args, data_dir, Path("unused"), 1)
    shards = TokenShards(data_dir, "train")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": args.model_vocab or shards.vocab_size})})
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = hf_model(cfg).to(device).train()
    if args.compile:
        model = torch.compile(model)
    # Same optimizer construction as ours (fused kernel on CUDA and CPU), so the comparison
    # isolates the model and the loop.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True if device.type in ("cuda", "cpu") else None)
    sampler = BlockSampler(shards, args.seq_len, seed=0)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    rates = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, y = sampler.batch(args.batch_size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the same host sync our loop does when it logs every step
        rates.append(args.batch_size * args.seq_len / (time.perf_counter() - start))
    return statistics.median(rates[args.warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary trained on the bench data")
    parser.add_argument("--model-vocab", type=int, help="model vocabulary (>= the tokenizer's; default: the tokenizer's)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_dir = prepare(workdir, args.vocab_size)
        ours, theirs = [], []
        for round_no in range(args.rounds):
            ours.append(run_bastion(args, data_dir, workdir, round_no))
            theirs.append(run_hf(args, data_dir, round_no))
            print(f"round {round_no}: bastion {ours[-1]:,.0f} tok/s   transformers {theirs[-1]:,.0f} tok/s", flush=True)
        cfg = bench_config(args, data_dir, workdir, 1)
        model = Transformer(cfg.model.model_copy(update={"vocab_size": args.model_vocab or TokenShards(data_dir).vocab_size}))

    ours_tps, hf_tps = statistics.median(ours), statistics.median(theirs)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": device_name, "preset": args.preset, "params": model.num_params(), "seq_len": args.seq_len,
        "batch_size": args.batch_size, "dtype": args.dtype, "compile": args.compile,
        "bastion_tokens_per_s": round(ours_tps), "transformers_tokens_per_s": round(hf_tps),
        "ratio": round(ours_tps / hf_tps, 3),
    }
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name), None)
    if peak:
        flops = model.flops_per_token(args.seq_len)
        result["bastion_mfu"] = round(flops * ours_tps / peak, 4)
        result["transformers_mfu"] = round(flops * hf_tps / peak, 4)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
