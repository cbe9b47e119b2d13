"""Find input files and stream NFC-normalised documents out of them, within size limits.

Formats: `.txt` / `.md` and any suffix listed in `DataConfig.text_suffixes` (e.g. `.py`;
the whole file is one document), `.jsonl` (one JSON object per line,
text under `DataConfig.text_field`), `.parquet` (a string column named `text_field`, read one
record batch at a time). Every error names the file, and the line or row where there is one.
"""
from __future__ import annotations

import glob
import json
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.config.schema import DataConfig
from bastion.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SUFFIXES = (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
PARQUET_BATCH_ROWS = 1024  # rows per decoded batch: bounds memory independent of file size


@dataclass(frozen=True)
class Document:
    text: str  # NFC-normalised
    source: str  # "path" or "path:line" (jsonl) or "path:row" (parquet)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _walk(folder: Path, suffixes: tuple[str, ...] = SUFFIXES) -> Iterator[Path]:
    """Supported files under `folder`, skipping hidden entries and not following dir symlinks
    (a link could lead outside the folder, or loop)."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                yield Path(root, name)


def resolve_sources(patterns: list[str], text_suffixes: tuple[str, ...] | list[str] = TEXT_SUFFIXES) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list.

    A pattern that yields no supported file is an error, as is a file named explicitly with
    an unsupported extension: silently training on nothing is worse than failing.
    """
    suffixes = (*text_suffixes, *RECORD_SUFFIXES)
    if not patterns:
        raise DataError("data.sources is empty: list at least one file, folder or glob pattern")
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            if not path.name.lower().endswith(suffixes):
                raise DataError(f"unsupported file type: {path} (expected one of {', '.join(suffixes)})")
            matches = [path]
        elif path.is_dir():
            matches = list(_walk(path, suffixes))
        elif _is_glob(pattern):
            matches = []
            for hit in glob.glob(os.path.expanduser(pattern), recursive=True):
                p = Path(hit)
                if p.is_dir():
                    matches.extend(_walk(p, suffixes))
                elif p.is_file() and p.name.lower().endswith(suffixes):
                    matches.append(p)
        else:
            raise DataError(f"data source not found: {pattern}")
        if not matches:
            raise DataError(f"data source {pattern!r} matched no {'/'.join(suffixes)} files")
        found.update(p.resolve() for p in matches)
    return sorted(found)


def check_sizes(files: list[Path], max_file_bytes: int, max_total_bytes: int) -> int:
    """Enforce the per-file and total byte limits before reading anything; returns the total."""
    total = 0
    for path in files:
        size = path.stat().st_size
        if size > max_file_bytes:
            raise DataError(f"{path} is {size} bytes, over data.max_file_bytes = {max_file_bytes}")
        total += size
        if total > max_total_bytes:
            raise DataError(
                f"sources total more than data.max_total_bytes = {max_total_bytes} bytes (limit crossed at {path})"
            )
    return total


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _read_limited(path: Path, limit: int) -> bytes:
    # Re-check while reading: the file may have grown since it was stat()ed.
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path} grew past data.max_file_bytes = {limit} while being read")
    return data


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}: {exc.reason}); is it a binary file?") from None


def _read_text(path: Path, limit: int) -> Iterator[Document]:
    text = _decode(_read_limited(path, limit), str(path)).removeprefix("\ufeff")
    if "\x00" in text:  # valid UTF-8 but NUL bytes: almost certainly not a text file
        raise DataError(f"{path}: contains NUL bytes; is it a binary file?")
    if text:  # an empty file is simply zero documents
        yield Document(_nfc(text), str(path))


def _read_jsonl(path: Path, limit: int, field: str) -> Iterator[Document]:
    read = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            read += len(raw)
            if read > limit:
                raise DataError(f"{path} grew past data.max_file_bytes = {limit} while being read")
            where = f"{path}:{lineno}"
            line = _decode(raw, where)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"{where}: invalid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                raise DataError(f"{where}: missing text field {field!r} (set data.text_field)")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
            yield Document(_nfc(text), where)


def _read_parquet(path: Path, limit: int, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); set data.text_field")
    col_type = schema.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"{path}: column {field!r} has type {col_type}, expected string")
    row = 0
    decoded = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                where = f"{path}:row {row}"
                row += 1
                if value is None:
                    raise DataError(f"{where}: column {field!r} is null")
                # Count decoded text too: a small, highly compressed file must not be able to
                # expand into unbounded text (a "decompression bomb").
                decoded += len(value.encode("utf-8"))
                if decoded > limit:
                    raise DataError(f"{path}: decoded text exceeds data.max_file_bytes = {limit}")
                yield Document(_nfc(value), where)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:row {row}: not valid UTF-8 ({exc.reason})") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: corrupt parquet data ({exc})") from None


def read_file(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """Documents of one file, in file order."""
    suffix = path.suffix.lower()
    if suffix in cfg.text_suffixes:
        return _read_text(path, cfg.max_file_bytes)
    if suffix == ".jsonl":
        return _read_jsonl(path, cfg.max_file_bytes, cfg.text_field)
    if suffix == ".parquet":
        return _read_parquet(path, cfg.max_file_bytes, cfg.text_field)
    raise DataError(f"unsupported file type: {path}")


def iter_documents(cfg: DataConfig, files: list[Path] | None = None) -> Iterator[Document]:
    """Stream every document of every source, in sorted-file order, one file open at a time.

    Size limits are checked for all files before the first document is produced.
    """
    if files is None:
        files = resolve_sources(cfg.sources, cfg.text_suffixes)
    check_sizes(files, cfg.max_file_bytes, cfg.max_total_bytes)
    for path in files:
        yield from read_file(path, cfg)
