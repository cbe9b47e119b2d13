"""Token shards: boundaries, verification of index.json and shard contents."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bastion.config.schema import DataConfig
from bastion.data import TokenShards, prepare_dataset, read_index
from synthetic.corpus import grammar_documents, write_corpus
from bastion.errors import DataError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    src = write_corpus(root / "in", grammar_documents(200, seed=3), "g")
    cfg = DataConfig(
        sources=[str(src)], output_dir=str(root / "ds"), shard_tokens=1024, val_fraction=0.1, allowed_roots=[str(root)],
        tokenizer={"vocab_size": 300},
    )
    prepare_dataset(cfg)
    return root / "ds"


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(dataset, tmp_path / "ds"))


def test_read_spans_shard_boundaries(dataset: Path) -> None:
    shards = TokenShards(dataset, "train")
    index = read_index(dataset)
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    assert len(files) >= 3
    flat = np.concatenate([np.fromfile(dataset / f, dtype="<u2") for f in files]).astype(np.int64)
    assert shards.num_tokens == len(flat) == len(shards)
    for start, length in [(0, 1), (1000, 50), (1023, 2), (1024, 1), (2040, 1100), (0, len(flat)), (len(flat) - 3, 3)]:
        got = shards.read(start, length)
        assert got.dtype == np.int64 and np.array_equal(got, flat[start : start + length])
    assert shards.read(len(flat), 0).size == 0
    for start, length in [(-1, 2), (len(flat) - 1, 2), (0, -1)]:
        with pytest.raises(IndexError):
            shards.read(start, length)


def test_val_split_is_readable(dataset: Path) -> None:
    val = TokenShards(dataset, "val", verify=True)
    assert val.num_tokens > 0 and val.documents > 0
    assert val.read(0, val.num_tokens)[-1] == val.eos_id


def test_tampered_shard_detected(copy: Path) -> None:
    shard = copy / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same length, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_000001\.bin failed its SHA-256"):
        TokenShards(copy, "train")
    TokenShards(copy, "train", verify=False)  # opt-out of hashing still opens (length matches)


def test_truncated_or_missing_shard_detected(copy: Path) -> None:
    shard = copy / "train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_000002\.bin is \d+ bytes"):
        TokenShards(copy, "train", verify=False)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_000002\.bin is missing"):
        TokenShards(copy, "train", verify=False)


def _edit_index(ds: Path, fn) -> None:
    path = ds / "index.json"
    index = json.loads(path.read_text())
    fn(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i: i.update(format="other"), "not a 'bastion-tokens' index"),
        (lambda i: i.update(version=2), "unsupported version"),
        (lambda i: i.update(dtype="float32"), "dtype"),
        (lambda i: i.update(eos_id=10**6), "eos_id"),
        (lambda i: i.update(vocab_size=70_000), "does not fit"),
        (lambda i: i["splits"]["train"]["shards"][0].update(file="../../etc/passwd"), "malformed shard"),
        (lambda i: i["splits"]["train"]["shards"][0].update(file="val_000000.bin"), "malformed shard"),
        (lambda i: i["splits"]["train"].update(tokens=1), "token total"),
    ],
)
def test_bad_index_rejected(copy: Path, edit, message: str) -> None:
    _edit_index(copy, edit)
    with pytest.raises(DataError, match=message):
        TokenShards(copy, "train")


def test_missing_or_garbled_index(tmp_path: Path, copy: Path) -> None:
    with pytest.raises(DataError, match="index.json not found"):
        TokenShards(tmp_path / "nowhere")
    (copy / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_index(copy)


def test_unknown_split(dataset: Path) -> None:
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(dataset, "test")
