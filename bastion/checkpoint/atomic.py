"""Crash-safe file primitives: owner-only permissions, fsync, atomic rename."""
from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) so it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write a new file with mode 0600 and fsync it; refuses to follow an existing symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, FILE_MODE)  # O_CREAT's mode is masked by umask; make it exact


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`: write a temp file beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
