"""File primitives every stage shares: owner-only permissions, no symlink following,
fsync, atomic rename, streaming SHA-256, bounded JSON."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

FILE_MODE = 0o600
DIR_MODE = 0o700
# A SHA-256 digest as Bastion writes it everywhere (manifests, key files, adapter configs).
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: Any) -> bool:
    """Whether `value` is a SHA-256 digest: 64 lower-case hex characters."""
    return isinstance(value, str) and SHA256_HEX.fullmatch(value) is not None


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_private(path: Path) -> BinaryIO:
    """A new binary file for writing, mode 0600, never through a pre-existing symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is masked by the umask; make it exact
    return os.fdopen(fd, "wb")


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) so it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write a new file with mode 0600 and fsync it; refuses to follow an existing symlink."""
    with open_private(path) as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`: write a temp file beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def write_dir_atomic(out_dir: Path, files: dict[str, bytes | Callable[[Path], object]], *,
                     replace: bool = False) -> Path:
    """Write `files` into a private temp folder beside out_dir (0700, files 0600), fsync, and
    rename it into place: readers see all of it or none. out_dir must not exist or be an
    empty folder (callers check); with `replace`, an existing out_dir is swapped out. A file
    given as a function is written by calling it with its path (a large file streamed by
    its writer, which must create it private and fsync it)."""
    parent = out_dir.parent
    parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, DIR_MODE)
        for name, data in files.items():
            if callable(data):
                data(tmp / name)
            else:
                write_bytes(tmp / name, data)
        fsync_dir(tmp)
        if replace and out_dir.exists() and any(out_dir.iterdir()):
            trash = parent / f".{out_dir.name}.trash-{os.getpid()}"
            os.replace(out_dir, trash)
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked by the caller): replace it
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return out_dir


def open_regular(path: Path, error: type[Exception]) -> BinaryIO:
    """`path` opened for reading without following a symlink, refused unless it is a
    regular file: what is read is the file checked, not whatever a link points to."""
    try:
        # O_NONBLOCK: opening a FIFO planted at `path` must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except OSError:
        raise error(f"{path}: not a regular file") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def read_regular(path: Path, max_bytes: int, error: type[Exception]) -> bytes:
    """At most max_bytes + 1 bytes of `path` (the caller compares the length with what it
    expects), read as `open_regular` opens it."""
    with open_regular(path, error) as fh:
        return fh.read(max_bytes + 1)


def read_text_limited(path: Path, max_bytes: int, error: type[Exception], what: str) -> str:
    """UTF-8 text of a regular file (no symlink) of at most max_bytes; every failure is
    `error` with a message naming `what` and the path."""
    if path.is_symlink() or not path.is_file():
        raise error(f"{what} not found (or not a regular file): {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{what} {path} is {size} bytes, over the limit of {max_bytes} bytes")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)  # re-checked: the file may have grown since stat()
    if len(data) > max_bytes:
        raise error(f"{what} {path} grew past the limit of {max_bytes} bytes while being read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not valid UTF-8 (byte {exc.start})") from None


MAX_JSON_DEPTH = 64  # deeper than any file Bastion reads or writes needs (tokenizer.json: < 10)
# A JSON string (escapes included), or an unterminated one running to the end: removed in one
# linear pass, so what is left is structure, numbers and literals.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[list(b"[{")], _BRACKET_STEP[list(b"]}")] = 1, -1


def json_depth(data: bytes) -> int:
    """How deeply `data` nests arrays and objects, measured on the bytes (strings removed,
    brackets counted in C) before any parser builds anything. About 20 ms per MB."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    steps = _BRACKET_STEP[np.frombuffer(brackets, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def parse_json(data: bytes | str, error: type[Exception], where: str, *, max_depth: int = MAX_JSON_DEPTH,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """JSON from bytes or text a file or request supplied, its nesting bounded (`max_depth`)
    before it is parsed; every failure (not UTF-8, not JSON, too deep) is one `error`
    naming `where`. Size is the caller's bound (it read at most so many bytes)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    # No deeper than it has openers: most files are settled by that count alone.
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else json_depth(raw)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except ValueError:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise error(f"{where}: not valid JSON (a number too long to read)") from None
    except RecursionError:  # (cannot happen below max_depth; kept as the last line of defence)
        raise error(f"{where}: JSON nested too deeply") from None


def read_json_limited(path: Path, max_bytes: int, error: type[Exception], what: str) -> Any:
    """Parsed JSON of a size-limited regular file, nesting bounded; errors as in
    `read_text_limited`."""
    return parse_json(read_text_limited(path, max_bytes, error, what), error, f"{what} {path}")
