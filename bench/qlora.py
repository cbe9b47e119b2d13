"""QLoRA vs LoRA: the same LoRA fine-tune over a full-precision base, an nf4 base and an int8
base (`finetune.lora.base_quantization`), side by side.

One model: a random Llama-style checkpoint (default d_model 512 x 8 layers, 8 heads / 4 KV
heads, SwiGLU 1408, a 4k BPE vocabulary trained on the Python standard library's source,
tied embeddings: 25.7M parameters). The same SFT data (reverse-the-words chat, packed rows),
the same LoRA settings (rank 16, alpha 32, all seven block projections), the same seed,
batch and steps. Each job is the real `bastion.train.train` in its own process (so its
memory is its own):

  * base weights held: the bytes of every frozen base tensor of the training model (the
    embedding, norms and the wrapped block weights, quantized or not), and of the wrapped
    block weights alone
  * peak memory (/proc/self/status VmHWM above the RSS after imports; torchao is imported
    in every job alike): over the training steps (the peak reset after step 1), and over
    the whole run, which includes reading the full-precision checkpoint. Measured in one
    run per mode of `--warmup` + 2 steps, with glibc told to return every tensor-sized
    block at once (so RSS follows the tensors; this slows steps down, hence:)
  * step time: in separate runs with the default allocator, modes alternating for
    `--rounds` rounds; the median over every round's steps after `--warmup`
  * loss: the first step's and the last step's (of the first timed round)

    OMP_NUM_THREADS=1 .venv/bin/python bench/qlora.py                   # ~3.5 min on 1 CPU core
    OMP_NUM_THREADS=1 .venv/bin/python bench/qlora.py --d-model 256 --layers 4 --steps 6
    .venv/bin/python bench/qlora.py --device cuda --dtype bfloat16 --d-model 2048 --layers 16 --seq-len 1024
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memstat, llama_cpp_gguf_check
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures

MODES = ("none", "nf4", "int8")
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def build(work: Path, args: argparse.Namespace) -> None:
    """work/base (a random checkpoint) and work/sft.jsonl."""
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer
    from llama_cpp_gguf_check import stdlib_text
    from synthetic.chat import reverse_chat_records, write_jsonl

    tok = BastionTokenizer.train(stdlib_text(1_000_000), vocab_size=args.vocab)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": args.d_model, "n_layer": args.layers,
                                  "n_head": args.heads, "n_kv_head": args.kv_heads,
                                  "max_seq_len": max(512, args.seq_len)},
                        "train": {"seq_len": 128}})
    torch.manual_seed(0)
    net = Transformer(cfg.model)
    print(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, d_model {args.d_model} x "
          f"{args.layers} layers, vocabulary {tok.vocab_size}", flush=True)
    save_checkpoint(work / "base", 0, Checkpoint(model=net.state_dict(), trainer_state={"step": 0},
                                                 config_yaml=to_yaml(cfg), tokenizer_json=tok.to_json_str()))
    write_jsonl(work / "sft.jsonl", reverse_chat_records(2000, seed=1, min_len=8, max_len=24))


def config(work: Path, args: argparse.Namespace, mode: str, out: Path, steps: int):
    from bastion.config import build_config

    return build_config({
        "train": {"objective": "sft", "out_dir": str(out), "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "max_steps": args.warmup + steps, "lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0,
                  "log_every": 1, "eval_every": 10**8, "device": args.device, "dtype": args.dtype, "seed": 0,
                  "threads": args.threads},
        "finetune": {"init_from": str(work / "base"), "train_file": str(work / "sft.jsonl"),
                     "max_length": args.seq_len,
                     "lora": {"enabled": True, "rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": TARGETS,
                              "base_quantization": mode}},
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1, "save_optimizer": False},
    }, source="bench config")


def base_bytes(work: Path, mode: str, device: str) -> dict[str, int]:
    """The frozen base tensors of the model a run of `mode` trains, built as the loop builds it."""
    import torch

    from bastion.checkpoint import load_checkpoint
    from bastion.checkpoint.contents import checkpoint_config
    from bastion.config.schema import LoraConfig
    from bastion.model import Transformer
    from bastion.model.lora import apply_lora, lora_modules, quantize_lora_base
    from bastion.model.qlora import tensor_bytes

    ckpt = load_checkpoint(work / "base", load_optimizer=False)
    model = Transformer.from_state_dict(checkpoint_config(ckpt).model, ckpt.model).to(device=device,
                                                                                     dtype=torch.float32)
    apply_lora(model, LoraConfig(enabled=True, target_modules=TARGETS))
    if mode != "none":
        quantize_lora_base(model, mode)
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    wrapped = [m.weight for m in lora_modules(model).values()] + [
        m.weight_scale for m in lora_modules(model).values() if m.weight_scale is not None]
    return {"base_bytes": sum(tensor_bytes(t) for t in frozen), "block_bytes": sum(tensor_bytes(t) for t in wrapped)}


def job(args: argparse.Namespace) -> None:
    """One run in this process; prints its measurements as one JSON line."""
    import torch

    from bastion.model.quantize import _torchao
    from bastion.train import train
    from memstat import reset_peak, status_bytes

    work = Path(args.work)
    mode, memory = args.job.split(":")[0], args.job.endswith(":memory")
    torch.set_num_threads(args.threads)
    _torchao()  # every job pays torchao's import alike
    cuda = args.device == "cuda"
    reset_peak()
    before = status_bytes("VmRSS")
    stamps, train_peak, start_peak = [], [], []

    def after_step(step: int) -> bool:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if step == 1:  # from here on: the training steps' own peak
            start_peak.append(status_bytes("VmHWM") - before)  # loading, building, quantizing, step 1
            reset_peak()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        else:
            train_peak.append(torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM") - before)
        return False

    steps = 2 if memory else args.steps
    result = train(config(work, args, mode, work / f"run-{mode}-{os.getpid()}", steps), quiet=True,
                   should_stop=after_step)
    if memory:
        overall = max(start_peak[0], status_bytes("VmHWM") - before) if not cuda else None
        print(json.dumps({"train_peak_bytes": max(train_peak), "peak_bytes": overall,
                          **base_bytes(work, mode, args.device)}))
    else:
        times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]
        print(json.dumps({"step_times": times, "first_loss": result.losses[0], "last_loss": result.losses[-1]}))


def run_job(name: str, work: Path, passthrough: list[str]) -> dict:
    env = dict(os.environ)
    if name.endswith(":memory"):
        # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS
        # would measure the allocator's history; a fixed threshold returns every
        # tensor-sized block (at a cost in page faults: not for the timed runs).
        env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, __file__, *passthrough, "--job", name, "--work", str(work)],
                          capture_output=True, text=True, timeout=3600, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per job and round")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per mode (modes alternate)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per job (at least 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step allocates the optimizer state)")
    if args.job:
        return job(args)

    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("seq_len", "batch_size", "rank", "steps", "warmup", "threads", "dtype", "device")]
    results: dict[str, dict] = {mode: {"step_times": []} for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work, args)
        for mode in MODES:
            r = results[mode] | run_job(f"{mode}:memory", work, passthrough)
            results[mode] = r
            overall = "" if r["peak_bytes"] is None else f" (whole run {r['peak_bytes'] / 2**20:7.1f})"
            print(f"{mode:>5}: base {r['base_bytes'] / 2**20:6.1f} MiB (blocks {r['block_bytes'] / 2**20:6.1f})  "
                  f"training peak {r['train_peak_bytes'] / 2**20:7.1f} MiB{overall}", flush=True)
        for round_no in range(args.rounds):
            for mode in MODES:
                r = run_job(f"{mode}:speed", work, passthrough)
                results[mode]["step_times"] += r["step_times"]
                if round_no == 0:
                    results[mode] |= {"first_loss": r["first_loss"], "last_loss": r["last_loss"]}
                print(f"round {round_no} {mode:>5}: step {statistics.median(r['step_times']):.3f} s  "
                      f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    for r in results.values():
        r["step_s"] = statistics.median(r["step_times"])
    plain = results["none"]
    summary = {"device": args.device, "dtype": args.dtype, "d_model": args.d_model, "layers": args.layers,
               "seq_len": args.seq_len, "batch_size": args.batch_size, "rank": args.rank, "steps": args.steps,
               "warmup": args.warmup, "rounds": args.rounds, "jobs": {}}
    for mode, r in results.items():
        summary["jobs"][mode] = {
            "base_mib": round(r["base_bytes"] / 2**20, 1), "block_mib": round(r["block_bytes"] / 2**20, 1),
            "train_peak_mib": round(r["train_peak_bytes"] / 2**20, 1),
            "train_peak_vs_lora": round(r["train_peak_bytes"] / plain["train_peak_bytes"], 3),
            "peak_mib": None if r["peak_bytes"] is None else round(r["peak_bytes"] / 2**20, 1),
            "step_s": round(r["step_s"], 4), "step_time_vs_lora": round(r["step_s"] / plain["step_s"], 2),
            "first_loss": round(r["first_loss"], 4), "last_loss": round(r["last_loss"], 4)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
