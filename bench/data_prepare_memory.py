"""Peak memory of `bastion data prepare` as the corpus grows 10x.

Builds a synthetic corpus of unique documents (random words, ~2 KB each, JSONL) at 1x and 10x
`--mb`, then prepares each in a fresh subprocess and reports peak resident memory (VmHWM from
/proc, the process's own peak: ru_maxrss of a child would carry the forking parent's) of the
parent and of the largest worker, which a sampling thread reads from /proc/<pid>/status while
the workers live. The tokenizer trains on a fixed `--sample-mb` sample, so what may grow with
the corpus is the per-document dedup state only; runs with near-dedup on and off show it.

    python bench/data_prepare_memory.py [--mb 8] [--sample-mb 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(20_000)]
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        doc = 0
        while written < target:
            text = f"document {doc}: " + " ".join(rng.choices(vocab, k=300))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            doc += 1


def vm_hwm(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(corpus: str, out: str, workers: int, near: bool, sample_mb: float) -> None:
    """Runs in the subprocess: one prepare, then its peaks as JSON on stdout."""
    from bastion.config.schema import DataConfig
    from bastion.data import prepare_dataset

    worker_peak = [0]
    done = threading.Event()

    def sample_workers() -> None:  # a worker's VmHWM only grows, so the last reading is its peak
        while not done.wait(0.05):
            for proc in multiprocessing.active_children():
                try:
                    worker_peak[0] = max(worker_peak[0], vm_hwm(proc.pid))
                except OSError:
                    pass  # it exited between listing and reading

    thread = threading.Thread(target=sample_workers, daemon=True)
    thread.start()
    cfg = DataConfig(sources=[corpus], output_dir=out, allowed_roots=[str(Path(corpus).parent)], workers=workers,
                     dedup={"near": near}, tokenizer={"vocab_size": 4096, "train_sample_bytes": int(sample_mb * 2**20)})
    start = time.perf_counter()
    report = prepare_dataset(cfg)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    print(json.dumps({"parent_peak_mb": round(vm_hwm() / 2**20, 1), "worker_peak_mb": round(worker_peak[0] / 2**20, 1),
                      "documents": report.documents, "seconds": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="size of the 1x corpus")
    parser.add_argument("--sample-mb", type=float, default=2.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            corpus = Path(tmp) / f"corpus{scale}x.jsonl"
            write_corpus(corpus, args.mb * scale)
            for workers in (1, 2):
                for near in (False, True):
                    out = Path(tmp) / f"out-{scale}-{workers}-{near}"
                    cmd = [sys.executable, __file__, "--child", str(corpus), str(out), str(workers), str(int(near)),
                           str(args.sample_mb)]
                    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
                    row = {"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "workers": workers, "near_dedup": near,
                           **json.loads(result.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"load_avg": [round(x, 2) for x in os.getloadavg()], "runs": rows}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        corpus, out, workers, near, sample_mb = sys.argv[2:7]
        child(corpus, out, int(workers), near == "1", float(sample_mb))
    else:
        main()
