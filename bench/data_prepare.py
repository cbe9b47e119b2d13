"""`bastion data prepare` throughput with every hygiene step on vs off, on real text: the
Python standard library's source (the demo corpus, ~6.4 MB). Interleaved rounds in one
process; reports MB/s of input and the ratio.

    python bench/data_prepare.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

from bastion.config import build_config
from bastion.data import prepare_dataset
from bastion.demo import STDLIB_PARTS

OFF = {"sanitize": {"enabled": False}, "dedup": {"exact": False, "near": False},
       "quality": {"max_non_text_fraction": 1.0, "max_repeated_line_fraction": 1.0}}


def run(workdir: Path, hygiene: bool, round_no: int):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = workdir / f"{'on' if hygiene else 'off'}-{round_no}"
    data = {"sources": [str(stdlib / p) for p in STDLIB_PARTS], "text_suffixes": [".py"],
            "output_dir": str(out), "allowed_roots": [str(stdlib), str(workdir)], "tokenizer": {"vocab_size": 4096}}
    cfg = build_config({"data": data if hygiene else {**data, **OFF}})
    start = time.perf_counter()
    report = prepare_dataset(cfg.data)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            for hygiene in (True, False):
                seconds, report = run(Path(tmp), hygiene, round_no)
                times[hygiene].append(seconds)
                print(f"round {round_no} hygiene={'on ' if hygiene else 'off'}: {seconds:.2f} s, "
                      f"{report.input_bytes / 1e6 / seconds:.2f} MB/s", flush=True)
                if hygiene:
                    on_report = report
    mb = on_report.input_bytes / 1e6
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(json.dumps({
        "input_mb": round(mb, 2), "documents": on_report.documents_read,
        "hygiene_on_mb_s": round(mb / on, 2), "hygiene_off_mb_s": round(mb / off, 2),
        "on_over_off_time": round(on / off, 3),
        "redactions": on_report.redactions, "filtered": on_report.filtered,
        "duplicates_dropped": on_report.duplicates_dropped, "near_duplicates_dropped": on_report.near_duplicates_dropped,
    }, indent=2))


if __name__ == "__main__":
    main()
