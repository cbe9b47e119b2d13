"""Training memory vs speed: what activation checkpointing, chunked cross-entropy and FSDP2
buy, and what they cost, against the plain loop, side by side in one run.

    plain        the default loop
    ckpt         train.activation_checkpointing: recompute each block in backward
    chunked      train.loss_chunk_tokens: cross-entropy over chunks of tokens, never the
                 whole [tokens, vocab] logits at once
    ckpt+chunked both
    ddp-2, fsdp-2   (with --distributed) the plain loop on 2 ranks under torchrun: DDP
                 replicates weights + AdamW state on every rank, FSDP2 shards them

Every job is the real `bastion.train.train` in its own process, so its peak is its own.
Memory is the training's own peak, read after every step (rank 0's under torchrun): on
CUDA torch.cuda.max_memory_allocated; on the CPU the process's peak RSS minus its RSS
just before training starts (Python, torch and the data already loaded; glibc told to
return tensor-sized blocks at once, so RSS follows the tensors). The peak with
the final checkpoint is reported apart: to write one file, a sharded run gathers the
whole state onto rank 0's CPU memory. Throughput is the median tokens/s of the steps after `--warmup`.
Jobs alternate round by round so machine noise hits them alike.

    python bench/train_memory.py                        # CPU (~2 min on 2 cores)
    python bench/train_memory.py --distributed          # + DDP vs FSDP2 per-rank memory
    python bench/train_memory.py --jobs ddp-2,fsdp-2 --preset base --seq-len 128 --batch-size 4
    python bench/train_memory.py --device cuda --preset base --seq-len 1024 --batch-size 16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOBS = {
    "plain": {},
    "ckpt": {"activation_checkpointing": True},
    "chunked": {"loss_chunk_tokens": 1024},
    "ckpt+chunked": {"activation_checkpointing": True, "loss_chunk_tokens": 1024},
}
DISTRIBUTED = {"ddp-2": "ddp", "fsdp-2": "fsdp"}


def config(args: argparse.Namespace, data_dir: Path, out: Path, **train_settings):
    from bastion.config import build_config

    return build_config({
        "model": {"preset": args.preset, "max_seq_len": max(args.seq_len, 128), "dropout": 0.0},
        "train": {"data_dir": str(data_dir), "out_dir": str(out), "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "max_steps": args.warmup + args.steps, "lr": 1e-3,
                  "warmup_steps": 2, "eval_every": 10**8, "log_every": 1, "dtype": args.dtype,
                  "device": args.device, "seed": 0, **train_settings},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1, "save_optimizer": False},
    }, source="bench config")


def job(args: argparse.Namespace) -> None:
    """One training run in this process; prints {"peak_bytes", "tokens_per_s"} as JSON (rank 0)."""
    import torch

    from bastion.train import train
    from bastion.train.metrics import read_metrics

    work = Path(args.work)
    name = args.job
    settings = dict(JOBS.get(name, {}))
    if name in DISTRIBUTED:
        settings["parallel"] = DISTRIBUTED[name]
        settings["batch_size"] = args.batch_size // 2  # the same global batch as the others
    out = work / f"{name}-{os.environ.get('RANK', '0')}-{os.getpid()}"
    cfg = config(args, work / "data", out, **settings)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sys.path.insert(0, str(Path(__file__).parent))
    from memstat import status_bytes

    before = status_bytes("VmRSS")

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before

    # Read after every step, before the final checkpoint (gathering a sharded model's whole
    # state onto rank 0 to write one file is a save-time cost, reported apart).
    training_peak = []
    train(cfg, quiet=True, should_stop=lambda step: training_peak.append(peak()) and False)
    if os.environ.get("RANK", "0") == "0":
        rates = [r["tokens_per_s"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        print(json.dumps({"peak_bytes": max(training_peak), "peak_with_save_bytes": peak(),
                          "tokens_per_s": statistics.median(rates[args.warmup:])}))


def run_job(name: str, args: argparse.Namespace, work: Path, passthrough: list[str]) -> dict:
    cmd = [__file__, *passthrough, "--job", name, "--work", str(work)]
    if name in DISTRIBUTED:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd]
    else:
        cmd = [sys.executable, *cmd]
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would
    # measure the allocator's history; a fixed threshold returns every tensor-sized block.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distributed", action="store_true", help="also DDP vs FSDP2 on 2 ranks (CPU: gloo)")
    parser.add_argument("--jobs", help=f"comma-separated subset of {','.join([*JOBS, *DISTRIBUTED])} "
                        "(the first is the baseline)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return job(args)

    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("preset", "seq_len", "batch_size", "steps", "warmup", "dtype", "device")]
    names = list(JOBS) + (list(DISTRIBUTED) if args.distributed else [])
    if args.jobs:
        names = args.jobs.split(",")
        unknown = [n for n in names if n not in JOBS and n not in DISTRIBUTED]
        if unknown:
            parser.error(f"unknown job(s) {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(Path(__file__).parent))
        from train_throughput import prepare

        prepare(work, args.vocab_size)  # -> work / "data"
        results: dict[str, list[dict]] = {n: [] for n in names}
        for round_no in range(args.rounds):
            for name in names:
                results[name].append(run_job(name, args, work, passthrough))
                r = results[name][-1]
                print(f"round {round_no} {name:>13}: training peak {r['peak_bytes'] / 2**20:8.1f} MiB "
                      f"(with the final save {r['peak_with_save_bytes'] / 2**20:8.1f})  "
                      f"{r['tokens_per_s']:9,.0f} tok/s", flush=True)

    baseline = results[names[0]]
    plain_mem = statistics.median(r["peak_bytes"] for r in baseline)
    plain_tps = statistics.median(r["tokens_per_s"] for r in baseline)
    summary = {"device": args.device, "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "dtype": args.dtype, "jobs": {}}
    for name, rows in results.items():
        mem = statistics.median(r["peak_bytes"] for r in rows)
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        saving = statistics.median(r["peak_with_save_bytes"] for r in rows)
        summary["jobs"][name] = {"peak_mib": round(mem / 2**20, 1), "memory_vs_baseline": round(mem / plain_mem, 3),
                                 "peak_with_save_mib": round(saving / 2**20, 1),
                                 "tokens_per_s": round(tps), "speed_vs_baseline": round(tps / plain_tps, 3)}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
