"""`data.workers` > 1: the same bytes as one worker, worker deaths as clear errors, and the
seeded, bounded tokenizer sample."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bastion.cli import app
from bastion.config.schema import DataConfig
from bastion.data import prepare_dataset
from bastion.data.prepare import _TokenizerSample
from bastion.errors import DataError
from synthetic.prepare_corpus import dataset_files, mixed_documents, write_sources
from synthetic.prepare_corpus import prepare_config as config

def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    src = write_sources(tmp_path / "src", mixed_documents(160))
    one = prepare_dataset(config(tmp_path, src, "one", workers=1))
    two = prepare_dataset(config(tmp_path, src, "two", workers=2))
    files = dataset_files(tmp_path / "one")
    assert sum(name.startswith("train_") for name in files) > 1  # several shards, so boundaries are compared too
    assert files == dataset_files(tmp_path / "two")
    assert {**one.to_dict(), "output_dir": ""} == {**two.to_dict(), "output_dir": ""}
    assert one.duplicates_dropped == 1 and one.near_duplicates_dropped == 1 and one.filtered == {"non_text": 1}
    assert one.redactions["EMAIL"] == 1 and one.val.documents > 0
    assert not list(tmp_path.glob("*.tmp-*"))  # the spill went with the temporary folder


def test_a_killed_worker_fails_the_run_and_keeps_the_previous_dataset(tmp_path: Path) -> None:
    src = write_sources(tmp_path / "src", mixed_documents(160))
    prepare_dataset(config(tmp_path, src, "out", workers=1))
    before = dataset_files(tmp_path / "out")
    killed: list[int] = []

    def kill_a_worker(stage: str, count: int) -> None:
        if stage == "scan" and not killed:  # after the first chunk: the pool is up and has work queued
            victim = multiprocessing.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(timeout=60)
            killed.append(victim.pid)

    with pytest.raises(DataError, match="worker process died"):
        prepare_dataset(config(tmp_path, src, "out", workers=2), on_progress=kill_a_worker)
    assert killed
    assert dataset_files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary or partial output


def test_tokenizer_sample_is_bounded_and_does_not_depend_on_file_order(tmp_path: Path) -> None:
    docs = mixed_documents(120)
    budget = 4096
    a = prepare_dataset(config(tmp_path, write_sources(tmp_path / "a", docs, files=3), "out_a",
                               tokenizer={"vocab_size": 400, "train_sample_bytes": budget}))
    b = prepare_dataset(config(tmp_path, write_sources(tmp_path / "b", docs[::-1], files=5), "out_b",
                               tokenizer={"vocab_size": 400, "train_sample_bytes": budget}))
    assert 0 < a.tokenizer_train_bytes <= budget and a.tokenizer_train_documents < a.train.documents
    assert (a.tokenizer_train_bytes, a.tokenizer_train_documents) == (b.tokenizer_train_bytes, b.tokenizer_train_documents)
    assert (tmp_path / "out_a" / "tokenizer.json").read_bytes() == (tmp_path / "out_b" / "tokenizer.json").read_bytes()
    prepare_dataset(config(tmp_path, tmp_path / "a", "out_c", seed=99,
                    tokenizer={"vocab_size": 400, "train_sample_bytes": budget}))
    assert (tmp_path / "out_c" / "tokenizer.json").read_bytes() != (tmp_path / "out_a" / "tokenizer.json").read_bytes()


def test_sample_keeps_the_smallest_keys_that_fit() -> None:
    rng = random.Random(3)
    texts = [f"doc {i} " + "x" * rng.randint(0, 300) for i in range(200)]
    sample = _TokenizerSample(budget=5000, seed=1)
    offered = []
    for i, text in enumerate(texts):
        digest = i.to_bytes(16, "little")
        sample.offer(digest, text)
        offered.append((_key(digest), text))
    expected, used = [], 0
    for _, text in sorted(offered):  # brute force: smallest keys first, until one does not fit
        if used + len(text) > 5000:
            break
        expected.append(text)
        used += len(text)
    assert list(sample.texts()) == expected and sample.bytes == used


def _key(digest: bytes) -> float:
    from bastion.data.prepare import _unit_hash

    return _unit_hash(1, b"tokenizer-sample", digest)


@pytest.mark.parametrize("field,value", [("workers", 0), ("workers", 257)])
def test_workers_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        DataConfig(**{field: value})


def test_train_sample_bytes_bounds() -> None:
    with pytest.raises(ValidationError, match="train_sample_bytes"):
        DataConfig(tokenizer={"train_sample_bytes": 100})


def test_cli_workers_option(tmp_path: Path) -> None:
    src = write_sources(tmp_path / "src", mixed_documents(40), files=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps({"data": {"allowed_roots": [str(tmp_path)], "tokenizer": {"vocab_size": 300}}}))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", "-c", str(cfg_file), "--source", str(src),
                                 "-o", str(tmp_path / "out"), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "index.json").is_file()
    bad = runner.invoke(app, ["data", "prepare", "-c", str(cfg_file), "--source", str(src), "--workers", "0"])
    assert bad.exit_code != 0 and "--workers" in bad.output
