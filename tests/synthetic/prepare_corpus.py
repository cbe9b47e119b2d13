"""A small corpus with work for every `data prepare` hygiene step, split over several JSONL
files, and helpers to compare prepared datasets byte for byte (tests of data.workers and
data.engine)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from bastion.config.schema import DataConfig

WORDS = ("harbour ferry budget river council tide crane dock ledger permit vessel cargo timber "
         "lantern signal anchor bridge canal market quarry meadow orchard mill forge").split()


def mixed_documents(n: int) -> list[str]:
    """n prose documents plus one secret-bearing edit, a near duplicate, an exact duplicate and junk."""
    rng = random.Random(7)
    docs = [f"Entry {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for i in range(n)]
    docs[3] += " contact ops@example.com, key AKIAIOSFODNN7EXAMPLE"
    words = docs[5].split()
    docs.append(" ".join(words[:-1] + ["edited"]))  # near-duplicate of docs[5]
    docs.append(docs[8])  # exact duplicate
    docs.append("\x00\x01\x02" * 30)  # non-text
    return docs


def write_sources(folder: Path, docs: list[str], files: int = 3) -> Path:
    """`docs` dealt round-robin into `files` JSONL files under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        part = docs[f::files]
        (folder / f"part{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return folder


def prepare_config(tmp_path: Path, src: Path, out: str, **kw) -> DataConfig:
    """Small shards and chunks, so shard boundaries and chunk order are exercised."""
    kw.setdefault("tokenizer", {"vocab_size": 400})
    return DataConfig(sources=[str(src)], output_dir=str(tmp_path / out), allowed_roots=[str(tmp_path)],
                      val_fraction=0.1, shard_tokens=1024, batch_documents=16, **kw)


def dataset_files(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared dataset but report.json (which names its own folder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}
