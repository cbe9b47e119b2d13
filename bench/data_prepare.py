"""`bastion data prepare` throughput: 1 vs 2 workers, every hygiene step on vs off, against the
bare tokenizer's `encode_batch` on the same corpus (the limit a prepare run can approach: it
must at least tokenize everything). Corpus: the Python standard library's source (the demo
corpus, ~6.4 MB). All runs in this one process, interleaved per round (the limit too); medians.

The prepare runs load one tokenizer trained up front (`tokenizer.path`), as the limit does, so
the ratio measures the pipeline, not BPE training; one more row per worker count trains the
tokenizer on a `--sample-mb` sample as a default run does. Also checks that 2 workers wrote
the same shard bytes as 1.

    python bench/data_prepare.py [--rounds 2] [--sample-mb 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

from bastion.config import build_config
from bastion.data import iter_documents, prepare_dataset, resolve_sources
from bastion.safepath import Roots
from bastion.tokenizer import BastionTokenizer

OFF = {"sanitize": {"enabled": False}, "dedup": {"exact": False, "near": False},
       "quality": {"max_non_text_fraction": 1.0, "max_repeated_line_fraction": 1.0}}
VOCAB = 4096


def data_section(workdir: Path, out: str, workers: int, hygiene: bool, tokenizer: dict) -> dict:
    # Imported here, not at the top: worker processes import this script as their main module,
    # and bastion.demo imports torch.
    from bastion.demo import STDLIB_PARTS

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = {"sources": [str(stdlib / p) for p in STDLIB_PARTS], "text_suffixes": [".py"], "workers": workers,
            "output_dir": str(workdir / out), "allowed_roots": [str(stdlib), str(workdir)], "tokenizer": tokenizer}
    return build_config({"data": data if hygiene else {**data, **OFF}}).data


def encode_seconds(texts: list[str], tok: BastionTokenizer, batch: int) -> float:
    """`encode_batch` over the corpus in batches of data.batch_documents (HF tokenizers' threads, all cores)."""
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        tok.encode_batch(texts[i : i + batch])
    return time.perf_counter() - start


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample-mb", type=float, default=2.0, help="tokenizer.train_sample_bytes for the training rows")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = data_section(work, "unused", 1, False, {"vocab_size": VOCAB})
        files = resolve_sources(base.sources, base.text_suffixes, roots=Roots(base.allowed_roots))
        tok = BastionTokenizer.train((d.text for d in iter_documents(base, files)), VOCAB)
        tok.save(work / "tokenizer.json")
        texts = [d.text for d in iter_documents(base, files)]
        corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
        limit_times = []
        given = {"path": str(work / "tokenizer.json")}
        sample = {"vocab_size": VOCAB, "train_sample_bytes": int(args.sample_mb * 2**20)}
        runs = {(w, h, t): [] for t in ("given", "sample") for w in (1, 2) for h in (True, False) if t == "given" or h}
        reports = {}
        for round_no in range(args.rounds):
            limit_times.append(encode_seconds(texts, tok, base.batch_documents))  # the limit, in every round too
            print(f"round {round_no} encode_batch: {limit_times[-1]:.2f} s", flush=True)
            for (workers, hygiene, tokenizer), times in runs.items():
                name = f"w{workers}-{'on' if hygiene else 'off'}-{tokenizer}"
                cfg = data_section(work, name, workers, hygiene, given if tokenizer == "given" else sample)
                start = time.perf_counter()
                reports[name] = prepare_dataset(cfg)
                times.append(time.perf_counter() - start)
                print(f"round {round_no} {name}: {times[-1]:.2f} s", flush=True)
        identical = all(shard_bytes(work / f"w1-{h}-{t}") == shard_bytes(work / f"w2-{h}-{t}")
                        for h, t in (("on", "given"), ("off", "given"), ("on", "sample")))
    mb = corpus_bytes / 1e6
    limit = mb / statistics.median(limit_times)
    rows = []
    for (workers, hygiene, tokenizer), times in runs.items():
        rate = mb / statistics.median(times)
        rows.append({"workers": workers, "hygiene": hygiene, "tokenizer": tokenizer,
                     "mb_s": round(rate, 2), "of_limit": round(rate / limit, 2)})
    on = reports["w1-on-given"]
    print(json.dumps({
        "corpus_mb": round(mb, 2), "documents": on.documents_read, "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "encode_batch_limit_mb_s": round(limit, 2), "runs": rows, "two_workers_byte_identical": identical,
        "tokenizer_sample_bytes": reports["w1-on-sample"].tokenizer_train_bytes,
        "redactions": on.redactions, "duplicates_dropped": on.duplicates_dropped,
        "near_duplicates_dropped": on.near_duplicates_dropped,
    }, indent=2))


if __name__ == "__main__":  # required: with data.workers > 1 the worker processes import the main module
    main()
