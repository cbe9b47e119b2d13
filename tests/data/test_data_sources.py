"""Finding files and reading documents: formats, limits, and error messages."""
from __future__ import annotations

import json
import random
import re
import string
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bastion.config.schema import DataConfig
from bastion.data.sources import iter_documents, resolve_sources
from bastion.errors import DataError
from reading_memory import read_in_child

MiB = 1 << 20


def docs(tmp_path: Path, *sources: str, **kw) -> list[str]:
    kw.setdefault("allowed_roots", [str(tmp_path)])
    cfg = DataConfig(sources=list(sources), output_dir=str(tmp_path / "out"), **kw)
    return [d.text for d in iter_documents(cfg)]


def test_resolve_files_folders_globs_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    for rel in ["a.txt", "b/x.md", "b/deep/y.jsonl", "b/skip.csv", "b/.hidden.txt", "c.parquet"]:
        (tmp_path / rel).write_text("")
    got = resolve_sources([str(tmp_path / "b"), str(tmp_path / "*.txt"), str(tmp_path / "a.txt")], roots=[tmp_path])
    assert got == sorted(got)
    assert [p.name for p in got] == ["a.txt", "y.jsonl", "x.md"]  # sorted by full path, deduplicated
    assert [p.name for p in resolve_sources([str(tmp_path / "**" / "*.parquet")], roots=[tmp_path])] == ["c.parquet"]


def test_glob_matching_nothing_names_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(DataError, match="matched no"):
        resolve_sources([pattern], roots=[tmp_path])
    with pytest.raises(DataError, match="not found: .*missing.txt"):
        resolve_sources([str(tmp_path / "missing.txt")], roots=[tmp_path])
    with pytest.raises(DataError, match="empty"):
        resolve_sources([], roots=[tmp_path])


def test_unsupported_explicit_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type: .*data.csv"):
        resolve_sources([str(tmp_path / "data.csv")], roots=[tmp_path])


def test_empty_file_is_zero_documents(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    assert docs(tmp_path, str(tmp_path)) == []


def test_invalid_utf8_names_file(tmp_path: Path) -> None:
    (tmp_path / "blob.txt").write_bytes(b"ok\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"blob\.txt.*not valid UTF-8"):
        docs(tmp_path, str(tmp_path / "blob.txt"))


def test_nul_bytes_rejected(tmp_path: Path) -> None:
    (tmp_path / "nul.md").write_bytes(b"text\x00\x00\x00")
    with pytest.raises(DataError, match=r"nul\.md.*NUL"):
        docs(tmp_path, str(tmp_path / "nul.md"))


def test_oversized_file_names_file_and_limit(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x" * 10)
    (tmp_path / "big.txt").write_text("x" * 101)
    with pytest.raises(DataError, match=r"big\.txt is 101 bytes, over data\.max_file_bytes = 100"):
        docs(tmp_path, str(tmp_path), max_file_bytes=100)


def test_total_limit(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("x" * 40)
    with pytest.raises(DataError, match=r"max_total_bytes = 100.*2\.txt"):
        docs(tmp_path, str(tmp_path), max_total_bytes=100)


def test_nfc_normalisation_and_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffcafe\u0301".encode())
    assert docs(tmp_path, str(tmp_path / "a.txt")) == [unicodedata.normalize("NFC", "cafe\u0301")]


def test_jsonl_field_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
    assert docs(tmp_path, str(good), text_field="body") == ["one", "two"]

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a"}\n{"other": "b"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing text field 'text'"):
        docs(tmp_path, str(missing))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{not json}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        docs(tmp_path, str(bad))

    for i, line in enumerate(['["a list"]', '{"text": 5}', '{"text": null}']):
        path = tmp_path / f"shape{i}.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=rf"shape{i}\.jsonl:1"):
            docs(tmp_path, str(path))

    utf = tmp_path / "utf.jsonl"
    utf.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"utf\.jsonl:2: not valid UTF-8"):
        docs(tmp_path, str(utf))


def test_jsonl_deep_nesting_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:1"):
        docs(tmp_path, str(path))


def test_parquet_batches_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    texts = [f"row {i}" for i in range(2500)]
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), path, row_group_size=700)
    assert docs(tmp_path, str(path)) == texts

    with pytest.raises(DataError, match=r"t\.parquet: no column 'body'"):
        docs(tmp_path, str(path), text_field="body")

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    with pytest.raises(DataError, match=r"ints\.parquet: column 'text' has type int64"):
        docs(tmp_path, str(ints))

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(DataError, match=r"nulls\.parquet:row 1"):
        docs(tmp_path, str(nulls))

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet"):
        docs(tmp_path, str(junk))


def test_parquet_decompression_bomb_bounded(tmp_path: Path) -> None:
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": ["a" * 100_000] * 20}), path, compression="zstd")
    assert path.stat().st_size < 50_000
    with pytest.raises(DataError, match=r"bomb\.parquet: decoded text exceeds"):
        docs(tmp_path, str(path), max_file_bytes=50_000)


def letters(n: int, seed: int = 0) -> str:
    """Text that compresses about 1.7:1, so no ratio limit is what refuses it."""
    return "".join(random.Random(seed).choices(string.ascii_lowercase + " ", k=n))


def test_parquet_cell_over_the_document_limit_refused_by_row(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b", letters(2 * MiB), "d"]}), path)
    with pytest.raises(DataError, match=r"t\.parquet:row 2: a document longer than data\.max_document_bytes = 1048576"):
        docs(tmp_path, str(path), max_document_bytes=MiB)
    assert docs(tmp_path, str(path), max_document_bytes=2 * MiB)[2] == letters(2 * MiB)


def test_parquet_row_groups_checked_before_decoding(tmp_path: Path) -> None:
    """A 16 MiB cell that zstd packs into a few KB: refused from the footer's sizes."""
    path = tmp_path / "cell.parquet"
    pq.write_table(pa.table({"text": ["ab" * (8 * MiB)]}), path, compression="zstd", use_dictionary=False)
    assert path.stat().st_size < 20_000
    with pytest.raises(DataError, match=r"cell\.parquet: row group 0 has a compression ratio over 200:1"):
        docs(tmp_path, str(path))
    with pytest.raises(DataError, match=r"cell\.parquet: decoded text exceeds data\.max_file_bytes = 1048576 \(row group 0 declares"):
        docs(tmp_path, str(path), max_file_bytes=MiB)


def test_parquet_repeated_dictionary_value_is_not_multiplied(tmp_path: Path) -> None:
    """One 512 KiB value on 100,000 rows (dictionary-encoded: a 300 KB file, 50 GiB of text)
    stays one value: refused at data.max_file_bytes with nothing built. Measured peak RSS:
    151 MiB, against 1679 MiB before (each 1024-row batch was decoded to strings first)."""
    path = tmp_path / "dict.parquet"
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 100_000, pa.int32()), pa.array([letters(512 * 1024)]))
    pq.write_table(pa.table({"text": column}), path, store_schema=False)  # read back as plain strings
    assert path.stat().st_size < MiB
    message, peak_mib = read_in_child(path, tmp_path)
    assert re.fullmatch(r".*dict\.parquet: decoded text exceeds data\.max_file_bytes = 268435456", message), message
    assert peak_mib < 300, f"peak RSS {peak_mib} MiB"


def test_mixed_formats_in_one_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("from txt")
    (tmp_path / "b.md").write_text("# from md")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "d.parquet")
    assert docs(tmp_path, str(tmp_path)) == ["from txt", "# from md", "from jsonl", "from parquet"]


def test_text_suffixes_read_code_files_as_text(tmp_path):
    from bastion.config.schema import DataConfig

    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "b.txt").write_text("plain")
    with pytest.raises(DataError, match="matched no"):
        resolve_sources([str(tmp_path / "*.py")], roots=[tmp_path])
    cfg = DataConfig(sources=[str(tmp_path)], text_suffixes=[".py"], allowed_roots=[str(tmp_path)])
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == ["def f():\n    return 1\n"]


@pytest.mark.parametrize("bad", ["py", ".jsonl", "../x", ".a/b"])
def test_text_suffixes_validated(bad):
    from pydantic import ValidationError

    from bastion.config.schema import DataConfig

    with pytest.raises(ValidationError):
        DataConfig(text_suffixes=[bad])
