"""The code sandbox's overhead: seconds per trivial run (one process after another) and
throughput with 1, 2 and 4 workers on whatever cores this machine has. Medians of rounds.

    python bench/reward_sandbox.py [--runs 40] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.rewards.sandbox import SandboxLimits, isolation, run_many  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"isolation: {isolation().mode}; cpus: {os.cpu_count()}")
    limits = SandboxLimits(timeout_seconds=30, memory_mb=256)
    jobs = [("def f(x):\n    return x + 1\n", ["assert f(1) == 2"])] * args.runs
    start = time.perf_counter()
    for _ in range(args.runs):  # the floor: one bare interpreter start, no sandbox
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    print(f"bare `python -I -S -c pass`: {(time.perf_counter() - start) / args.runs * 1000:.1f} ms per run")
    for workers in (1, 2, 4):
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            results = run_many(jobs, limits, max_workers=workers)
            times.append(time.perf_counter() - start)
            assert all(r.passed for r in results), [r for r in results if not r.passed][:1]
        best = statistics.median(times)
        print(f"max_workers={workers}: {best / args.runs * 1000:.1f} ms per run, {args.runs / best:.1f} runs/s")


if __name__ == "__main__":
    main()
