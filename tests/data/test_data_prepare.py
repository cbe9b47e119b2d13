"""End-to-end `prepare_dataset`: filtering, splits, shards, determinism, safe output handling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from bastion.config.schema import DataConfig
from bastion.data import PrepareReport, TokenShards, prepare_dataset, read_index
from synthetic.corpus import arithmetic_documents, write_corpus
from bastion.errors import DataError
from bastion.tokenizer import BastionTokenizer


def cfg(tmp_path: Path, sources: list[str], **kw) -> DataConfig:
    kw.setdefault("tokenizer", {"vocab_size": 300, "min_frequency": 2})
    kw.setdefault("shard_tokens", 1024)
    kw.setdefault("allowed_roots", [str(tmp_path)])
    kw.setdefault("output_dir", str(tmp_path / "out"))
    return DataConfig(sources=sources, **kw)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "in", arithmetic_documents(300, seed=1), "arith")


def test_prepare_end_to_end(tmp_path: Path, corpus: Path) -> None:
    stages: list[str] = []
    report = prepare_dataset(cfg(tmp_path, [str(corpus)], val_fraction=0.1), lambda s, n: stages.append(s))
    assert isinstance(report, PrepareReport)
    assert {"scan", "tokenize", "done"} <= set(stages)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == [
        "index.json",
        "report.json",
        "tokenizer.json",
    ]
    assert (out.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in out.iterdir())
    assert not list(tmp_path.glob("out.tmp-*"))

    index = read_index(out)
    assert index["format"] == "bastion-tokens" and index["version"] == 1 and index["dtype"] == "uint16"
    assert report.documents == 300 and report.train.documents + report.val.documents == 300
    assert report.val.documents > 0 and report.train.documents > report.val.documents
    assert json.loads((out / "report.json").read_text())["train"]["tokens"] == report.train.tokens

    tok = BastionTokenizer.from_file(out / "tokenizer.json")
    train = TokenShards(out, "train")
    assert train.num_tokens == report.train.tokens == index["splits"]["train"]["tokens"]
    assert train.vocab_size == tok.vocab_size and train.eos_id == tok.eos_id
    all_ids = train.read(0, train.num_tokens)
    assert all_ids.dtype == np.int64
    assert int((all_ids == tok.eos_id).sum()) == report.train.documents  # one eos per document
    first_doc = all_ids[: int(np.argmax(all_ids == tok.eos_id))]
    assert tok.decode(first_doc.tolist()) in arithmetic_documents(300, seed=1)


def test_duplicates_and_short_documents_dropped_and_counted(tmp_path: Path) -> None:
    lines = ["alpha beta", "alpha beta", "gamma", "delta epsilon", "alpha beta", "x"]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    report = prepare_dataset(cfg(tmp_path, [str(src)], quality={"min_chars": 2}, val_fraction=0.0))
    assert report.documents_read == 6
    assert report.duplicates_dropped == 2 and report.filtered == {"too_short": 1}
    assert report.documents == report.train.documents == 3 and report.val.documents == 0
    assert read_index(tmp_path / "out")["splits"]["val"] == {"documents": 0, "shards": [], "tokens": 0}
    assert TokenShards(tmp_path / "out", "val").num_tokens == 0


def test_duplicates_detected_after_nfc(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("caf\u00e9 au lait")
    (tmp_path / "b.txt").write_text("cafe\u0301 au lait")  # same text once NFC-normalised
    report = prepare_dataset(cfg(tmp_path, [str(tmp_path / "*.txt")], val_fraction=0.0))
    assert (report.documents, report.duplicates_dropped) == (1, 1)


def test_mixed_formats(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain text document")
    (src / "b.md").write_text("# markdown document")
    (src / "c.jsonl").write_text(json.dumps({"text": "jsonl document"}) + "\n")
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), src / "d.parquet")
    (src / "empty.txt").write_text("")
    report = prepare_dataset(cfg(tmp_path, [str(src)], val_fraction=0.2))
    assert report.files == 5 and report.documents == 5
    assert report.train.documents > 0 and report.val.documents > 0  # forced non-empty even if tiny


def test_zero_documents_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no documents"):
        prepare_dataset(cfg(tmp_path, [str(tmp_path / "empty.txt")]))
    assert not (tmp_path / "out").exists()


def test_single_document_with_val_fraction_is_explained(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare_dataset(cfg(tmp_path, [str(tmp_path / "one.txt")], val_fraction=0.1))
    assert prepare_dataset(cfg(tmp_path, [str(tmp_path / "one.txt")], val_fraction=0.0)).documents == 1


def test_rerun_is_deterministic_and_replaces_dataset(tmp_path: Path, corpus: Path) -> None:
    c = cfg(tmp_path, [str(corpus)], val_fraction=0.1)
    prepare_dataset(c)
    first = (tmp_path / "out" / "index.json").read_text()
    (tmp_path / "out" / "stale_marker").write_text("old")
    prepare_dataset(c)
    assert (tmp_path / "out" / "index.json").read_text() == first
    assert not (tmp_path / "out" / "stale_marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no tmp/old dirs left


def test_seed_changes_split(tmp_path: Path, corpus: Path) -> None:
    a = prepare_dataset(cfg(tmp_path, [str(corpus)], val_fraction=0.2, seed=1))
    b = prepare_dataset(cfg(tmp_path, [str(corpus)], val_fraction=0.2, seed=2))
    assert a.documents == b.documents and a.val.tokens != b.val.tokens


def test_refuses_to_overwrite_non_dataset_dir(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a Bastion dataset"):
        prepare_dataset(cfg(tmp_path, [str(corpus)]))
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file_out").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        prepare_dataset(cfg(tmp_path, [str(corpus)], output_dir=str(tmp_path / "file_out")))


def test_empty_existing_output_dir_is_fine(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "out").mkdir()
    assert prepare_dataset(cfg(tmp_path, [str(corpus)])).documents == 300


def test_failure_keeps_previous_dataset(tmp_path: Path, corpus: Path) -> None:
    prepare_dataset(cfg(tmp_path, [str(corpus)]))
    before = (tmp_path / "out" / "index.json").read_text()
    bad = tmp_path / "in" / "zz_bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"zz_bad\.jsonl:2"):
        prepare_dataset(cfg(tmp_path, [str(tmp_path / "in")]))
    assert (tmp_path / "out" / "index.json").read_text() == before
    assert not list(tmp_path.glob("out.*"))


def test_existing_tokenizer_path_and_uint32(tmp_path: Path, corpus: Path) -> None:
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(66_000)})  # pushes ids past uint16
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    tok_path = tmp_path / "big_tokenizer.json"
    tok_path.write_text(raw.to_str())

    report = prepare_dataset(cfg(tmp_path, [str(corpus)], tokenizer={"path": str(tok_path)}, shard_tokens=1 << 20))
    assert not report.tokenizer_trained and report.vocab_size > 65_536 and report.dtype == "uint32"
    shards = TokenShards(tmp_path / "out", "train")
    assert shards.dtype == np.dtype("<u4")
    assert int(shards.read(0, shards.num_tokens).max()) == report.eos_id  # eos is the largest id here
    shard = tmp_path / "out" / "train_000000.bin"
    assert shard.stat().st_size == 4 * shards.num_tokens


def test_uint16_boundary() -> None:
    from bastion.data.shards import token_dtype

    assert token_dtype(65_536) == "uint16" and token_dtype(65_537) == "uint32"


def test_missing_tokenizer_path(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match="tokenizer file not found"):
        prepare_dataset(cfg(tmp_path, [str(corpus)], tokenizer={"path": str(tmp_path / "nope.json")}))
