"""Where a training step's time goes: torch.profiler over steps of the real loop.

Runs `bastion.train.train` on the benchmark data (bench/train_throughput.py's), skips
`--warmup` steps (compilation, allocator warm-up), records `--steps`, and prints the ops
and kernels that took the most time, plus, on CUDA, how busy the GPU was: the sum of
kernel time over the wall time of the recorded steps (what is left is launch overhead,
host syncs and data loading, the part MFU tuning goes after first).

    python bench/profile_step.py                                  # CPU, small preset
    python bench/profile_step.py --device cuda --preset base --model-vocab 50304 \\
        --seq-len 1024 --batch-size 16 --dtype bfloat16 --trace /tmp/trace.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import bench_config, prepare  # noqa: E402 - the same data and config as the throughput bench

from bastion.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-vocab", type=int)
    parser.add_argument("--steps", type=int, default=3, help="recorded steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps before recording")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=20, help="rows of the table")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)  # (bench_config's signature)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = prepare(work, args.vocab_size)
        cfg = bench_config(args, data_dir, work / "run", args.warmup + args.steps + 1)
        # Log (and read the loss back) every 10 steps, as a real run does, not every step.
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"log_every": 10})})
        with profile(activities=activities, schedule=schedule(wait=args.warmup - 1, warmup=1, active=args.steps,
                                                              repeat=1)) as prof:
            def each_step(step: int) -> bool:  # the loop calls this after every optimizer step
                if cuda:
                    torch.cuda.synchronize()
                marks.append(time.perf_counter())
                prof.step()
                return False

            train(cfg, quiet=True, should_stop=each_step)

    sort_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=sort_key, row_limit=args.rows))
    # Wall time of the recorded steps: between the marks that open and close them.
    recorded_wall = marks[args.warmup + args.steps - 1] - marks[args.warmup - 1]
    summary: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "preset": args.preset,
                     "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype,
                     "compile": args.compile, "recorded_steps": args.steps,
                     "step_seconds": round(recorded_wall / args.steps, 5)}
    if cuda:
        kernel_us = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA")
        summary["gpu_busy_fraction"] = round(kernel_us / 1e6 / recorded_wall, 3)
    top = sorted(averages, key=lambda e: getattr(e, "self_device_time_total" if cuda else "self_cpu_time_total"),
                 reverse=True)[: args.rows]
    summary["top"] = [{"name": e.key[:80], "self_us": round(getattr(e, "self_device_time_total" if cuda else
                                                                    "self_cpu_time_total")), "calls": e.count}
                      for e in top]
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}, indent=2))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
