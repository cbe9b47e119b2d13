"""The publish gate's secret scan against plain SHA-256 hashing of the same folder.

The scan reads every byte of every file once (hashing it in the same pass), runs the data
pipeline's secret detectors on text files and on the printable runs of binary data, and parses
JSON and safetensors headers for their strings. The baseline is `sha256_file` over the same
files: the least any upload does (huggingface_hub hashes every file it sends). Rounds
alternate scan and hash on the same folder (page cache warm for both); the median is reported.

    python bench/publish_scan.py [--mb 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from bastion.interop.filescan import listed_files, scan_folder
from bastion.safeio import sha256_file


def build(folder: Path, mb: int) -> None:
    torch.manual_seed(0)
    weights = torch.randn(mb * 2**20 // 4) * 0.02  # float32 weights as trained models have them
    safetensors.torch.save_file({"w": weights}, folder / "model.safetensors", metadata={"format": "pt"})
    vocab = {f"tok{i}-{i * 7919 % 100003}": i for i in range(50_000)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    (folder / "README.md").write_text("# card\n" + "Some prose about the model, its data and its config.\n" * 2000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="size of the weights file")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.mb)
        size = sum((folder / n).stat().st_size for n in listed_files(folder))
        scans, hashes = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            result = scan_folder(folder)
            scans.append(time.perf_counter() - start)
            assert not result.findings, result.findings
            start = time.perf_counter()
            for name in listed_files(folder):
                sha256_file(folder / name)
            hashes.append(time.perf_counter() - start)
    scan, hashed = statistics.median(scans), statistics.median(hashes)
    print(f"folder {size / 2**20:.0f} MiB: scan {scan:.2f} s ({size / 2**20 / scan:.0f} MiB/s), "
          f"sha256 only {hashed:.2f} s ({size / 2**20 / hashed:.0f} MiB/s), ratio {scan / hashed:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
