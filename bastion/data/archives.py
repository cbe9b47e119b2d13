"""Compressed sources, read as streams with hard limits: `.gz`, `.zst` and `.zip`.

Nothing is ever extracted to disk. Every member is decompressed in chunks through a meter
(`_Meter`) that counts the bytes actually produced and stops - with a `DataError` naming the
archive, the member and the limit - as soon as one is crossed:

  * `data.max_decompressed_bytes` per member (per `.gz`/`.zst` file),
  * `data.max_total_bytes` for everything read, decompressed bytes included (`Budget`),
  * a compression ratio above `MAX_RATIO`:1 once past `RATIO_FLOOR_BYTES`: no real text
    compresses that well, decompression bombs do.

Zip archives are checked before any member is read: at most `MAX_ZIP_MEMBERS` entries (read
from the end-of-central-directory record, before the directory itself is parsed), no hostile
member names (absolute, `..`, backslashes, drive letters, NUL - "zip-slip"), no duplicate
names, no encryption, only stored/deflated members (bzip2/lzma decompress a whole input chunk
at once, which a bomb can exploit), declared sizes within the limits and the ratio. The
declared size is not trusted: the bytes produced are counted too.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from bastion.errors import DataError

COMPRESSED_SUFFIXES = (".gz", ".zst")
ARCHIVE_SUFFIXES = (".zip",)
CHUNK_BYTES = 1 << 20  # decompressed bytes produced per step
MAX_RATIO = 200  # decompressed : compressed; above this a member is treated as a bomb
RATIO_FLOOR_BYTES = 1 << 20  # the ratio is only judged past this much output (tiny files compress oddly)
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_DIRECTORY_BYTES = 64 << 20  # central directory size, checked before parsing it
MAX_MEMBER_NAME_CHARS = 4096
ZSTD_MAX_WINDOW_BYTES = 1 << 27  # 128 MiB: zstd's own default ceiling, made explicit
ZSTD_FEED_BYTES = 1024  # compressed bytes per decompress call: at most ~32 MiB of output each
ZSTD_READ_BYTES = 64 << 10

_ZIP_ENCRYPTED = 0x1 | 0x40 | 0x2000  # traditional, strong, central-directory encryption
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_DRIVE = re.compile(r"^[A-Za-z]:")


class Budget:
    """Bytes read across all sources, against `data.max_total_bytes`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def add(self, n: int, where: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise DataError(
                f"sources total more than data.max_total_bytes = {self.limit} bytes "
                f"(decompressed archive data included; limit crossed at {where})"
            )


def compression_of(name: str) -> str | None:
    """".gz" or ".zst" if the file name ends with one (case-insensitive), else None."""
    lower = name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def open_regular(path: Path) -> BinaryIO:
    """Open a source for reading without following a symlink in its last component, and
    only if it is a regular file (not a FIFO or device that would block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _Meter(io.RawIOBase):
    """A read-only stream over a decompressor that counts what it produces and enforces the
    per-member limit, the total budget and the ratio while it streams."""

    def __init__(
        self,
        src: BinaryIO,
        *,
        where: str,
        limit: int,
        budget: Budget | None,
        compressed: Callable[[], int],
        declared: int | None = None,
        errors: tuple[type[BaseException], ...] = (),
    ):
        super().__init__()
        self._src = src
        self._where = where
        self._limit = limit
        self._budget = budget
        self._compressed = compressed  # compressed bytes consumed so far (or the member's total)
        self._declared = declared
        self._errors = (OSError, EOFError, zlib.error, zipfile.BadZipFile, *errors)
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readall(self) -> bytes:  # io's default reads 8 KiB at a time
        parts = []
        while chunk := self.read(CHUNK_BYTES):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        want = min(len(buffer), CHUNK_BYTES)
        try:
            data = self._src.read(want)
        except DataError:
            raise
        except self._errors as exc:
            raise DataError(f"{self._where}: corrupt compressed data ({type(exc).__name__}: {exc})") from None
        n = len(data)
        if n:
            self.produced += n
            if self.produced > self._limit:
                raise DataError(
                    f"{self._where}: decompresses to more than data.max_decompressed_bytes = {self._limit} bytes; "
                    "refusing it (raise the limit if this archive is trusted)"
                )
            if self._declared is not None and self.produced > self._declared:
                raise DataError(
                    f"{self._where}: decompresses to more than the {self._declared} bytes its header declares; "
                    "refusing a lying archive"
                )
            if self.produced > RATIO_FLOOR_BYTES:
                ratio = self.produced / max(1, self._compressed())
                if ratio > MAX_RATIO:
                    raise DataError(
                        f"{self._where}: compression ratio over {MAX_RATIO}:1 ({self.produced} bytes from "
                        f"{self._compressed()}); refusing a likely decompression bomb"
                    )
            if self._budget is not None:
                self._budget.add(n, self._where)
            buffer[:n] = data
        return n


def _buffered(meter: _Meter) -> io.BufferedReader:
    return io.BufferedReader(meter, buffer_size=CHUNK_BYTES)


# ---- .gz / .zst -------------------------------------------------------------------------


class _ZstdReader:
    """Zstandard frames decoded with bounded output that notice truncation.

    python-zstandard's `stream_reader` ends a truncated file with a short read and no error,
    and `decompressobj` returns all output of the input it is given at once; so input is fed
    `ZSTD_FEED_BYTES` at a time (one byte can expand to at most ~32 KiB: an RLE block), and a
    stream that ends inside a frame is an error.
    """

    def __init__(self, raw: BinaryIO, dctx):
        self._raw = raw
        self._dctx = dctx
        self._frame = None  # decompressor of the current frame
        self._pending = memoryview(b"")  # compressed bytes read but not yet fed
        self._out = memoryview(b"")  # decompressed bytes not yet returned
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._out and not self._done:
            self._step()
        n = len(self._out) if n < 0 else n
        chunk, self._out = self._out[:n], self._out[n:]
        return bytes(chunk)

    def _step(self) -> None:
        if not self._pending:
            self._pending = memoryview(self._raw.read(ZSTD_READ_BYTES))
            if not self._pending:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstd data ends inside a frame (truncated file?)")
                self._done = True
                return
        if self._frame is None or self._frame.eof:
            self._frame = self._dctx.decompressobj()  # next frame (concatenated .zst files)
        feed, self._pending = self._pending[:ZSTD_FEED_BYTES], self._pending[ZSTD_FEED_BYTES:]
        self._out = memoryview(self._frame.decompress(feed))
        if self._frame.eof and self._frame.unused_data:  # the next frame began in this feed
            self._pending = memoryview(bytes(self._frame.unused_data) + bytes(self._pending))



@contextmanager
def open_compressed(path: Path, limit: int, budget: Budget | None) -> Iterator[io.BufferedReader]:
    """The decompressed bytes of a `.gz` or `.zst` file as a metered binary stream."""
    kind = compression_of(path.name)
    raw = open_regular(path)
    try:
        errors: tuple[type[BaseException], ...] = ()
        if kind == ".gz":
            src: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == ".zst":
            import zstandard

            src = _ZstdReader(raw, zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES))
            errors = (zstandard.ZstdError,)
        else:
            raise DataError(f"{path}: not a .gz or .zst file")
        meter = _Meter(src, where=str(path), limit=limit, budget=budget, compressed=raw.tell, errors=errors)
        with _buffered(meter) as stream:
            yield stream
    finally:
        raw.close()


# ---- .zip -------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _directory_size(fh: BinaryIO, size: int) -> tuple[int, int] | None:
    """(entries, central directory bytes) from the end records, read before zipfile parses
    the directory (whose size a hostile file controls); None where they cannot be found,
    leaving it to zipfile to reject the file."""
    tail_len = min(size, _EOCD.size + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < _EOCD.size:
        return None
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, pos)
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the real numbers are further back
        loc = pos - _ZIP64_LOCATOR.size
        if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
            return None
        _, _, offset, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
        if offset + _ZIP64_EOCD.size > size:
            return None
        fh.seek(offset)
        record = fh.read(_ZIP64_EOCD.size)
        if len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
            return None
        fields = _ZIP64_EOCD.unpack(record)
        entries, cd_size = fields[7], fields[8]
    return entries, cd_size


def hostile_name(name: str) -> str | None:
    """Why a zip member name is refused (zip-slip and friends), or None if it is fine."""
    if "\x00" in name:
        return "contains a NUL byte"
    if len(name) > MAX_MEMBER_NAME_CHARS:
        return f"is longer than {MAX_MEMBER_NAME_CHARS} characters"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    if ".." in name.split("/"):
        return "contains a '..' component"
    return None


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/") if part)


@contextmanager
def open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """A zip archive, opened after checking its end records; raises DataError."""
    raw = open_regular(path)
    try:
        size = os.fstat(raw.fileno()).st_size
        counts = _directory_size(raw, size)
        if counts is not None:
            entries, cd_size = counts
            if entries > MAX_ZIP_MEMBERS:
                raise DataError(f"{path}: {entries} members, over the limit of {MAX_ZIP_MEMBERS}")
            if cd_size > MAX_ZIP_DIRECTORY_BYTES:
                raise DataError(
                    f"{path}: central directory of {cd_size} bytes, over the limit of {MAX_ZIP_DIRECTORY_BYTES}"
                )
        raw.seek(0)
        try:
            zf = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise DataError(f"{path}: not a readable zip archive ({exc})") from None
        with zf:
            if len(zf.infolist()) > MAX_ZIP_MEMBERS:  # the end record's count can lie
                raise DataError(f"{path}: more than {MAX_ZIP_MEMBERS} members, over the limit")
            yield zf
    finally:
        raw.close()


def zip_members(path: Path, zf: zipfile.ZipFile, suffixes: tuple[str, ...], limit: int) -> list[zipfile.ZipInfo]:
    """The members to read, sorted by name, after refusing the whole archive if any member
    is hostile or any member to read is unreadable or over a limit. Directories, hidden
    entries (`.x`, `__MACOSX/`) and other file types are skipped, as a folder walk skips them."""
    seen: set[str] = set()
    chosen: list[zipfile.ZipInfo] = []
    for info in zf.infolist():
        name = info.orig_filename
        reason = hostile_name(name)
        if reason:
            raise DataError(f"{path}: member name {name!r} {reason}; refusing a hostile archive (zip-slip)")
        if name in seen:
            raise DataError(f"{path}: member name {name!r} appears twice; refusing an ambiguous archive")
        seen.add(name)
        if info.is_dir() or _is_hidden(name):
            continue
        lower = name.lower()
        where = f"{path}!{name}"
        if lower.endswith((".parquet", *COMPRESSED_SUFFIXES, *ARCHIVE_SUFFIXES)):
            raise DataError(
                f"{where}: parquet files and nested archives are not read from inside a zip; "
                "extract it and list the file in data.sources"
            )
        if not lower.endswith(suffixes):
            continue
        if info.flag_bits & _ZIP_ENCRYPTED:
            raise DataError(f"{where}: member is encrypted; encrypted archives are not supported")
        if info.compress_type not in _ZIP_METHODS:
            raise DataError(
                f"{where}: compression method {info.compress_type} is not supported "
                "(only stored and deflated members are read)"
            )
        if info.file_size > limit:
            raise DataError(
                f"{where}: declares {info.file_size} bytes, over data.max_decompressed_bytes = {limit}"
            )
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise DataError(
                f"{where}: compression ratio over {MAX_RATIO}:1 ({info.file_size} bytes from "
                f"{info.compress_size}); refusing a likely decompression bomb"
            )
        chosen.append(info)
    if not chosen:
        raise DataError(f"{path}: holds no {'/'.join(suffixes)} members")
    return sorted(chosen, key=lambda i: i.orig_filename)


@contextmanager
def open_member(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, budget: Budget | None
) -> Iterator[io.BufferedReader]:
    """One zip member's bytes as a metered binary stream."""
    where = f"{path}!{info.orig_filename}"
    try:
        src = zf.open(info)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{where}: cannot read member ({exc})") from None
    compressed = max(1, info.compress_size)
    meter = _Meter(
        src, where=where, limit=limit, budget=budget, compressed=lambda: compressed, declared=info.file_size,
        errors=(NotImplementedError, ValueError, struct.error),
    )
    with src, _buffered(meter) as stream:
        yield stream
