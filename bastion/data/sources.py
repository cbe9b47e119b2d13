"""Find input files and stream NFC-normalised documents out of them, within size limits.

Formats: `.txt` / `.md` and any suffix listed in `DataConfig.text_suffixes` (e.g. `.py`;
the whole file is one document), `.jsonl` (one JSON object per line,
text under `DataConfig.text_field`), `.parquet` (a string column named `text_field`, read one
record batch at a time). Text and jsonl files may also be compressed - `x.txt.gz`,
`x.jsonl.zst` - or sit inside a `.zip` (see `bastion.data.archives` for the limits).
Every error names the file, and the line or row where there is one; a zip member is named
`archive.zip!member.jsonl:line`.

No document is held whole before its size is known: a text file or member is read at most
`data.max_document_bytes` + 1 bytes, a JSONL line likewise (`bounded_lines`, also used for fine-tuning JSONL), and a parquet
cell's length is read from Arrow's buffers before it becomes a Python string (dictionary
columns stay dictionaries, so a repeated cell is not multiplied). A longer document is
refused while streaming, so memory stays near that limit whatever a file decompresses to.

Every file a source names, or a folder or glob expands to, must resolve inside
`DataConfig.allowed_roots` (`bastion.safepath`): symlinks leading out are refused, not skipped.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bastion.config.schema import DataConfig
from bastion.data.archives import (
    ARCHIVE_SUFFIXES,
    COMPRESSED_SUFFIXES,
    MAX_RATIO,
    RATIO_FLOOR_BYTES,
    Budget,
    compression_of,
    open_compressed,
    open_member,
    open_regular,
    open_zip,
    zip_members,
)
from bastion.errors import DataError
from bastion.safepath import PathLike, Roots, check_path_text
from bastion.safeio import parse_json

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
SUFFIXES = (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
DEFAULT_ROOTS = (".",)  # as DataConfig.allowed_roots: the current directory
PARQUET_BATCH_ROWS = 1024  # rows per decoded batch: bounds memory independent of file size
PARQUET_SLICE_BYTES = 4 << 20  # parquet text turned into Python strings at a time


@dataclass(frozen=True)
class Document:
    text: str  # NFC-normalised
    source: str  # "path", "path:line" (jsonl), "path:row N" (parquet), "archive.zip!member[:line]"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def supported_suffixes(text_suffixes: Iterable[str] = TEXT_SUFFIXES) -> tuple[str, ...]:
    """Every file-name ending a folder walk or glob picks up (lower case)."""
    streamable = (*(s.lower() for s in text_suffixes), ".jsonl")
    compressed = tuple(s + c for s in streamable for c in COMPRESSED_SUFFIXES)
    return (*streamable, ".parquet", *compressed, *ARCHIVE_SUFFIXES)


def file_format(name: str, text_suffixes: Iterable[str] = TEXT_SUFFIXES) -> tuple[str, str | None] | None:
    """(format, container) of a file name: format "text" | "jsonl" | "parquet" | "zip" and
    container None | ".gz" | ".zst"; None if unsupported."""
    lower = name.lower()
    text = tuple(s.lower() for s in text_suffixes)
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "zip", None
    container = compression_of(lower)
    inner = lower[: -len(container)] if container else lower
    suffix = os.path.splitext(inner)[1]
    if suffix in text:
        return "text", container
    if suffix == ".jsonl":
        return "jsonl", container
    if suffix == ".parquet":
        return "parquet", container
    return None


def _check_format(real: Path, shown: str, text_suffixes: Sequence[str]) -> None:
    fmt = file_format(real.name, text_suffixes)
    if fmt is None:
        expected = ", ".join(supported_suffixes(text_suffixes))
        target = f" (-> {real})" if shown != str(real) else ""
        raise DataError(f"unsupported file type: {shown}{target} (expected one of {expected})")
    if fmt[0] == "parquet" and fmt[1]:
        raise DataError(
            f"{shown}: parquet inside {fmt[1]} is not supported (parquet compresses internally); "
            "decompress it or write it with parquet's own compression"
        )


def _walk_pairs(folder: Path, suffixes: tuple[str, ...], roots: Roots) -> Iterator[tuple[Path, Path]]:
    """(path as found, resolved path) of each supported file under the (resolved) `folder`,
    skipping hidden entries and not following directory symlinks (they could loop). A symlink
    - to a file or a folder - that leads outside the roots is refused, not skipped: silently
    dropping data is worse."""

    def fail(exc: OSError) -> None:
        raise DataError(f"cannot list {exc.filename}: {exc.strerror or exc}")

    for root, dirs, files in os.walk(folder, followlinks=False, onerror=fail):
        keep = []
        for name in dirs:
            if name.startswith("."):
                continue
            full = Path(root, name)
            if full.is_symlink():
                roots.confine(full, "data source folder")  # refuses a link out; never followed
                continue
            keep.append(name)
        dirs[:] = sorted(keep)
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            full = Path(root, name)
            if not full.is_symlink():  # the folder is resolved and no dir link is followed: already real
                if not full.is_file():
                    raise DataError(f"data source file {full} is not a regular file (a FIFO, socket or device?)")
                yield full, full
                continue
            real = roots.confine(full, "data source file")
            if not real.is_file():
                raise DataError(f"data source file {full} is a broken symlink or not a regular file")
            if not real.name.lower().endswith(suffixes):
                raise DataError(f"unsupported file type: {full} (-> {real})")
            yield full, real


def _walk(folder: Path, suffixes: tuple[str, ...], roots: Roots) -> Iterator[Path]:
    return (real for _, real in _walk_pairs(folder, suffixes, roots))


def _match_parts(parts: tuple[str, ...], pats: tuple[str, ...]) -> bool:
    """Glob match of path components; "**" matches any number of components."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match_parts(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match_parts(parts[1:], pats[1:])


def _recursive_glob(base: Path, rest: str, suffixes: tuple[str, ...], roots: Roots) -> list[Path]:
    """A `**` pattern, expanded by our own walk: `glob` follows directory symlinks under `**`,
    and two links to `.` make that exponential. A file matches if its path, or the path of a
    folder above it, matches (a matched folder stands for everything under it)."""
    if not base.is_dir():
        return []
    pats = Path(rest).parts
    found = []
    for full, real in _walk_pairs(base, suffixes, roots):
        parts = full.relative_to(base).parts
        if any(_match_parts(parts[:k], pats) for k in range(1, len(parts) + 1)):
            found.append(real)
    return found


def _split_glob(pattern: Path) -> tuple[Path, str]:
    """(fixed leading folder, the rest with the wildcards) of a glob pattern."""
    parts = pattern.parts
    for i, part in enumerate(parts):
        if _is_glob(part):
            base = Path(*parts[:i]) if i else Path(".")
            return base, os.path.join(*parts[i:])
    return pattern, ""


def _expand_glob(pattern: str, given: Path, suffixes: tuple[str, ...], roots: Roots) -> list[Path]:
    if ".." in given.parts:
        roots.confine(pattern, "data source")  # raises: '..' is refused
    base, rest = _split_glob(given)
    base_real = roots.confine(base, f"data source {pattern!r}: the folder a glob starts from")
    if "**" in Path(rest).parts:
        return _recursive_glob(base_real, rest, suffixes, roots)
    matches = []
    for hit in sorted(glob.glob(rest, root_dir=base_real)):
        real = roots.confine(base_real / hit, f"data source {pattern!r} match")
        if real.is_dir():
            matches.extend(_walk(real, suffixes, roots))
        elif real.is_file() and real.name.lower().endswith(suffixes):
            matches.append(real)
    return matches


def resolve_sources(
    patterns: list[str],
    text_suffixes: tuple[str, ...] | list[str] = TEXT_SUFFIXES,
    *,
    roots: Iterable[PathLike] | Roots | None = None,
) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list
    of resolved paths, each inside `roots` (default: the current directory, as
    `DataConfig.allowed_roots`; pass `roots=cfg.allowed_roots`).

    A pattern that yields no supported file is an error, as is a file named explicitly with
    an unsupported extension: silently training on nothing is worse than failing. A glob is
    expanded from its fixed leading folder, which must itself be inside the roots.
    """
    allowed = Roots(DEFAULT_ROOTS if roots is None else roots)
    text_suffixes = tuple(s.lower() for s in text_suffixes)
    suffixes = supported_suffixes(text_suffixes)
    if not patterns:
        raise DataError("data.sources is empty: list at least one file, folder or glob pattern")
    found: set[Path] = set()
    for pattern in patterns:
        check_path_text(pattern, "data source")
        given = Path(pattern).expanduser()
        if not _is_glob(pattern) or os.path.lexists(given):
            real = allowed.confine(pattern, "data source")
            if real.is_file():
                _check_format(real, pattern, text_suffixes)
                matches = [real]
            elif real.is_dir():
                matches = list(_walk(real, suffixes, allowed))
            elif os.path.lexists(given):
                raise DataError(f"data source {pattern} is not a regular file or folder (a broken symlink?)")
            else:
                raise DataError(f"data source not found: {pattern}")
        else:
            matches = _expand_glob(pattern, given, suffixes, allowed)
        if not matches:
            raise DataError(f"data source {pattern!r} matched no {'/'.join(suffixes)} files")
        found.update(matches)
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


def _too_long(where: str, limit: int, limit_name: str = "data.max_document_bytes") -> DataError:
    return DataError(f"{where}: a document longer than {limit_name} = {limit} bytes; refused while "
                     "reading (raise the limit if documents this long are expected)")


def _read_document(stream: BinaryIO, limit: int, where: str) -> bytes:
    """A whole-file document, read no further than `limit` + 1 bytes: a longer one is
    refused before more of it is held (a 512 MB member of a 10 MB .gz never is)."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _too_long(where, limit)
    return data


def bounded_lines(stream: BinaryIO, limit: int, where: str,
                  limit_name: str = "data.max_document_bytes") -> Iterator[bytes]:
    """The lines of `stream`, none held past `limit` bytes (its newline aside): a longer line
    is refused once `limit` + 1 of its bytes are read, a newline-free stream included."""
    lineno = 0
    while line := stream.readline(limit + 1):
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise _too_long(f"{where}:{lineno}", limit, limit_name)
        yield line


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte {exc.start}: {exc.reason}); is it a binary file?") from None


def _text_document(data: bytes, where: str) -> Iterator[Document]:
    text = _decode(data, where).removeprefix("\ufeff")
    if "\x00" in text:  # valid UTF-8 but NUL bytes: almost certainly not a text file
        raise DataError(f"{where}: contains NUL bytes; is it a binary file?")
    if text:  # an empty file is simply zero documents
        yield Document(_nfc(text), where)


def _jsonl_documents(lines: Iterable[bytes], where: str, field: str) -> Iterator[Document]:
    for lineno, raw in enumerate(lines, start=1):
        loc = f"{where}:{lineno}"
        line = _decode(raw, loc)
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        obj = parse_json(line, DataError, f"{loc}: invalid JSON")
        if not isinstance(obj, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
        if field not in obj:
            raise DataError(f"{loc}: missing text field {field!r} (set data.text_field)")
        text = obj[field]
        if not isinstance(text, str):
            raise DataError(f"{loc}: field {field!r} must be a string, got {type(text).__name__}")
        yield Document(_nfc(text), loc)


def _read_text(path: Path, cfg: DataConfig) -> Iterator[Document]:
    with open_regular(path) as f:
        data = _read_document(f, cfg.max_document_bytes, str(path))
    # Re-checked while reading: the file may have grown since it was stat()ed.
    if len(data) > cfg.max_file_bytes:
        raise DataError(f"{path} grew past data.max_file_bytes = {cfg.max_file_bytes} while being read")
    yield from _text_document(data, str(path))


def _read_jsonl(path: Path, cfg: DataConfig) -> Iterator[Document]:
    limit = cfg.max_file_bytes

    def lines(f: BinaryIO) -> Iterator[bytes]:
        read = 0
        for raw in bounded_lines(f, cfg.max_document_bytes, str(path)):
            read += len(raw)
            if read > limit:
                raise DataError(f"{path} grew past data.max_file_bytes = {limit} while being read")
            yield raw

    with open_regular(path) as f:
        yield from _jsonl_documents(lines(f), str(path), cfg.text_field)


def _read_stream(stream: BinaryIO, fmt: str, where: str, cfg: DataConfig) -> Iterator[Document]:
    """Documents of one decompressed stream (a .gz/.zst file or a zip member)."""
    if fmt == "text":
        yield from _text_document(_read_document(stream, cfg.max_document_bytes, where), where)
    else:
        yield from _jsonl_documents(bounded_lines(stream, cfg.max_document_bytes, where), where, cfg.text_field)


def _read_compressed(path: Path, fmt: str, cfg: DataConfig, budget: Budget | None) -> Iterator[Document]:
    with open_compressed(path, cfg.max_decompressed_bytes, budget) as stream:
        yield from _read_stream(stream, fmt, str(path), cfg)


def _read_zip(path: Path, cfg: DataConfig, budget: Budget | None) -> Iterator[Document]:
    limit = cfg.max_decompressed_bytes
    with open_zip(path) as zf:
        for info in zip_members(path, zf, (*cfg.text_suffixes, ".jsonl"), limit):
            fmt = "jsonl" if info.orig_filename.lower().endswith(".jsonl") else "text"
            with open_member(path, zf, info, limit, budget) as stream:
                yield from _read_stream(stream, fmt, f"{path}!{info.orig_filename}", cfg)


def _check_row_groups(pf: Any, path: Path, field: str, limit: int) -> None:
    """What each row group's text column declares, checked before any of it is decoded: at
    most `limit` (data.max_file_bytes) bytes and the archives' compression ratio, so a
    small, highly compressed file cannot make Arrow build a huge page."""
    meta = pf.metadata
    column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == field)
    for group in range(meta.num_row_groups):
        chunk = meta.row_group(group).column(column)
        raw, packed = chunk.total_uncompressed_size, chunk.total_compressed_size
        if raw > limit:
            raise DataError(f"{path}: decoded text exceeds data.max_file_bytes = {limit} "
                            f"(row group {group} declares {raw} bytes)")
        if raw > RATIO_FLOOR_BYTES and raw > MAX_RATIO * max(1, packed):
            raise DataError(f"{path}: row group {group} has a compression ratio over {MAX_RATIO}:1 ({raw} bytes "
                            f"from {packed}); refusing a likely decompression bomb")


def _cell_bytes(column: Any) -> list[int | None]:
    """The UTF-8 length of each cell (None for null), computed by Arrow on its buffers (a
    dictionary column through its dictionary): no cell becomes a Python string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        return pc.take(pc.binary_length(column.dictionary), column.indices).to_pylist()
    return pc.binary_length(column).to_pylist()


def _parquet_batch(column: Any, first_row: int, path: Path, cfg: DataConfig, decoded: list[int]) -> Iterator[Document]:
    """Documents of one decoded batch: each cell's size checked before it is built, then
    turned into strings `PARQUET_SLICE_BYTES` at a time. `decoded`: [bytes so far], shared."""
    sizes = _cell_bytes(column)
    start = acc = 0
    for i, size in enumerate(sizes):
        where = f"{path}:row {first_row + i}"
        if size is None:
            raise DataError(f"{where}: column {cfg.text_field!r} is null")
        if size > cfg.max_document_bytes:
            raise _too_long(where, cfg.max_document_bytes)
        # Decoded text counts too: a small, highly compressed file must not expand unbounded.
        decoded[0] += size
        if decoded[0] > cfg.max_file_bytes:
            raise DataError(f"{path}: decoded text exceeds data.max_file_bytes = {cfg.max_file_bytes}")
        acc += size
        if acc >= PARQUET_SLICE_BYTES or i == len(sizes) - 1:
            for j, value in enumerate(column.slice(start, i + 1 - start).to_pylist()):
                yield Document(_nfc(value), f"{path}:row {first_row + start + j}")
            start, acc = i + 1, 0


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = cfg.text_field
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
    _check_row_groups(pf, path, field, cfg.max_file_bytes)
    # Dictionary-encoded text stays encoded: one long value repeated on many rows is held
    # once, and each row's length is checked before the row becomes a string.
    row, decoded = 0, [0]
    try:
        pf = pq.ParquetFile(path, metadata=pf.metadata, read_dictionary=[field])
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            yield from _parquet_batch(batch.column(0), row, path, cfg, decoded)
            row += batch.num_rows
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:row {row}: not valid UTF-8 ({exc.reason})") from None
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: corrupt parquet data ({exc})") from None


def read_file(path: Path, cfg: DataConfig, *, budget: Budget | None = None) -> Iterator[Document]:
    """Documents of one file (or archive), in file order. `budget`, if given, counts the
    bytes read (decompressed, for archives) against data.max_total_bytes."""
    fmt = file_format(path.name, cfg.text_suffixes)
    if fmt is None:
        raise DataError(f"unsupported file type: {path}")
    kind, container = fmt
    if kind == "zip":
        return _read_zip(path, cfg, budget)
    if container:
        if kind == "parquet":
            _check_format(path, str(path), cfg.text_suffixes)  # raises with the reason
        return _read_compressed(path, kind, cfg, budget)
    if budget is not None:
        budget.add(path.stat().st_size, str(path))
    if kind == "text":
        return _read_text(path, cfg)
    if kind == "jsonl":
        return _read_jsonl(path, cfg)
    return _read_parquet(path, cfg)


def iter_documents(cfg: DataConfig, files: list[Path] | None = None) -> Iterator[Document]:
    """Stream every document of every source, in sorted-file order, one file open at a time.

    Every file must resolve inside `cfg.allowed_roots` (checked again as it is opened, also
    for `files` passed in). Size limits on disk are checked for all files before the first
    document is produced; decompressed bytes are counted against `max_decompressed_bytes`
    per member and, with everything else read, against `max_total_bytes` as they stream.
    """
    roots = Roots(cfg.allowed_roots)
    if files is None:
        files = resolve_sources(cfg.sources, cfg.text_suffixes, roots=roots)
    check_sizes(files, cfg.max_file_bytes, cfg.max_total_bytes)
    budget = Budget(cfg.max_total_bytes)
    for path in files:
        real = roots.confine(path, "data source file", must_exist=True)
        yield from read_file(real, cfg, budget=budget)
