"""The JSON-lines access log of `bastion serve`.

One object per request: time, request id, key id (never the key), method, path (without the
query string), status, latency, the model served (the base's name or an adapter's), token
counts, finish reason and error reason. Prompt and completion text are written only when
`log_prompts` is on (ServeConfig.log_prompts, off by default): a log is copied, shipped and
kept far more widely than the data it describes.

The file is opened append-only and created private (0600); an existing file is made 0600.
Writing never raises into the request path: failures are counted (`write_errors`) and the
first one is reported on stderr.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bastion.errors import ConfigError

MAX_PATH_CHARS = 2048
MAX_ERROR_CHARS = 1024


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Thread-safe JSON-lines writer to `path`, or to stderr when `path` is None."""

    def __init__(self, path: str | os.PathLike[str] | None, log_prompts: bool = False) -> None:
        self.log_prompts = log_prompts
        self.path = Path(path).expanduser() if path is not None else None
        self.write_errors = 0
        self._reported = False
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            self._fd = self._open(self.path)

    @staticmethod
    def _open(path: Path) -> int:
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot open access log {path}: {exc.strerror}") from None
        else:
            if stat.S_ISLNK(st.st_mode):
                raise ConfigError(f"cannot open access log {path}: is a symlink")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device: refused before open() can block
                raise ConfigError(f"access log {path} is not a regular file")
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            why = "is a symlink" if path.is_symlink() else exc.strerror
            raise ConfigError(f"cannot open access log {path}: {why}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"access log {path} is not a regular file")
            if stat.S_IMODE(st.st_mode) != 0o600:
                try:
                    os.fchmod(fd, 0o600)  # the umask may have widened a new file; an old one too
                except OSError as exc:
                    raise ConfigError(f"access log {path} has mode {stat.S_IMODE(st.st_mode):04o} and "
                                      f"cannot be made 0600: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(
        self,
        *,
        request_id: str | None,
        key_id: str | None,
        method: str | None,
        path: str,
        status: int,
        latency_ms: float,
        model: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
        error: str | None = None,
        prompt: Any = None,
        completion: Any = None,
    ) -> None:
        """Write one record. `prompt` (a string or chat messages) and `completion` are
        dropped unless log_prompts is on. Never raises."""
        try:
            record: dict[str, Any] = {
                "time": _utc_now(),
                "request_id": request_id,
                "key_id": key_id,
                "method": method,
                "path": str(path).split("?", 1)[0][:MAX_PATH_CHARS],
                "status": int(status),
                "latency_ms": round(float(latency_ms), 3),
                "model": model,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "finish_reason": finish_reason,
                "error": error[:MAX_ERROR_CHARS] if isinstance(error, str) else error,
            }
            if self.log_prompts:
                record["prompt"] = prompt
                record["completion"] = completion
            # ensure_ascii: no raw control or bidi characters from user text reach a terminal
            line = json.dumps(record, ensure_ascii=True, default=str) + "\n"
            self._write(line)
        except Exception as exc:  # noqa: BLE001 - logging must never fail a request
            self._failed(exc)

    log = write  # alias

    def _write(self, line: str) -> None:
        data = line.encode("ascii")
        with self._lock:
            if self._fd is None:
                if self.path is not None:
                    raise OSError("access log is closed")
                stream = sys.stderr
                stream.write(line)
                stream.flush()
                return
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.write_errors += 1
            first = not self._reported
            self._reported = True
        if first:
            where = self.path if self.path is not None else "stderr"
            with contextlib.suppress(Exception):  # stderr itself may be what is failing
                print(f"bastion serve: cannot write the access log ({where}): {type(exc).__name__}: {exc}; "
                      "further failures are only counted", file=sys.stderr, flush=True)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __enter__(self) -> AccessLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
