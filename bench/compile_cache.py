"""train.compile_cache: a cold torch.compile vs a warm one that loads the sealed cache.

Each run is `bastion.train.train()` with `train.compile: true` and `train.compile_cache`
pointing at one folder, in its own fresh Python process (nothing in memory carries over; the
cache folder and the HMAC key are the only things shared). Runs alternate cold (cache folder
emptied first) and warm (the entry the cold run before it sealed), `--rounds` times each.
Reported per run: seconds from calling train() to the end of the first optimizer step (which
is where the forward and backward graphs compile), the whole run's wall time, and the CPU
seconds of the process and every compiler process it started (gcc on CPU) - the number that
holds still when the machine is shared. Ratios are warm / cold, medians.

    OMP_NUM_THREADS=1 python bench/compile_cache.py            # ~6-15 minutes on a 2-core CPU
    python bench/compile_cache.py --preset mini --rounds 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its timings and the cache's events."""
    from bastion.config import build_config
    from bastion.train import train

    cfg = build_config({"model": {"preset": args.preset, "dropout": 0.0},
                        "train": {"data_dir": args.data, "out_dir": args.out, "seq_len": 64, "batch_size": 8,
                                  "max_steps": args.steps, "eval_every": args.steps, "eval_batches": 1,
                                  "log_every": args.steps, "threads": 1, "device": "cpu", "compile": True,
                                  "compile_cache": args.cache},
                        "checkpoint": {"every_steps": args.steps, "keep_last": 1}})
    start, first_step = time.perf_counter(), []

    def note_first_step(step: int) -> bool:
        if not first_step:
            first_step.append(time.perf_counter() - start)
        return False

    result = train(cfg, quiet=True, should_stop=note_first_step)
    total = time.perf_counter() - start
    print(json.dumps({"first_step_s": first_step[0], "run_s": total, "events": result.compile_cache,
                      "losses": result.losses}))


def run_once(args: argparse.Namespace, work: Path, data: Path, cache: Path, name: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--steps", str(args.steps),
           "--data", str(data), "--out", str(work / name), "--cache", str(cache)]
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and the compilers it waited for
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return record


def prepare(work: Path) -> Path:
    from bastion.config import build_config
    from bastion.data import prepare_dataset
    from synthetic.corpus import arithmetic_documents, write_corpus

    write_corpus(work / "src", arithmetic_documents(1500, seed=0, max_operand=20), name="arith")
    cfg = build_config({"data": {"sources": [str(work / "src")], "output_dir": str(work / "data"),
                                 "allowed_roots": [str(work)], "val_fraction": 0.1, "tokenizer": {"vocab_size": 300}}})
    prepare_dataset(cfg.data)
    return work / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset (bastion/config/presets.py)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="cold/warm pairs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="bench-compile-cache-"))
    try:
        data, cache, runs = prepare(work), work / "cache", {"cold": [], "warm": []}
        for round_ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for kind in ("cold", "warm"):
                record = run_once(args, work, data, cache, f"{kind}{round_}")
                runs[kind].append(record)
                print(f"{kind:4}  first step {record['first_step_s']:7.1f} s  run {record['run_s']:7.1f} s  "
                      f"cpu {record['cpu_s']:7.1f} s  | {'; '.join(e[:90] for e in record['events'])}", flush=True)
            assert runs["warm"][-1]["losses"] == runs["cold"][-1]["losses"], "warm run trained differently"
            assert any(e.startswith("hit") for e in runs["warm"][-1]["events"]), runs["warm"][-1]["events"]
        summary = {m: statistics.median(r[m] for r in runs["warm"]) / statistics.median(r[m] for r in runs["cold"])
                   for m in ("first_step_s", "run_s", "cpu_s")}
        print("warm / cold (median): " + ", ".join(f"{m} {v:.2f}x" for m, v in summary.items()))
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "warm_over_cold": summary, "preset": args.preset}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
