"""Answer equivalence with math-verify, bounded in time and memory from outside.

math-verify's own timeouts use signal.alarm: they fail outside the main thread (GRPO scores
rollouts wherever it likes) and do not stop C-level work. So `MathVerifier` sends each
(gold, prediction) pair to one long-lived worker process (`_math_worker.py`) and waits at
most `timeout_s` for its answer; a pair that takes longer scores "not equivalent" and the
worker is killed (SIGKILL) and a fresh one started at once. The first worker starts on first
use, not when the reward is built, so `bastion config validate` stays cheap.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from bastion.errors import BastionError

WORKER = Path(__file__).with_name("_math_worker.py")
START_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; not part of any answer's budget


class MathVerifier:
    """`equivalent(gold, pred)`: does the prediction's final answer equal the gold one?"""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._lock = threading.Lock()  # one request in flight per worker
        self.restarts = 0  # workers killed for running over their time (tests and logs read it)

    def equivalent(self, gold: str, pred: str) -> bool:
        request = (json.dumps({"gold": gold, "pred": pred}) + "\n").encode()
        with self._lock:
            proc = self._ready_worker()
            try:
                assert proc.stdin is not None
                proc.stdin.write(request)
                proc.stdin.flush()
                answer = self._read_line(self.timeout_s)
            except OSError:  # the worker died (its memory cap): treat like a timeout
                answer = None
            if answer is None:
                self.restarts += 1
                self._stop()
                self._spawn()  # the next worker imports sympy while the caller goes on
                return False
            return answer == b"1"

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _spawn(self) -> None:
        # -I: the worker imports only the standard library and math-verify, never from the cwd.
        self._proc = subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self._buffer = b""
        self._ready = False
        weakref.finalize(self, _kill, self._proc)

    def _ready_worker(self) -> subprocess.Popen:
        """The worker, started if needed and past its imports ("ready")."""
        if self._proc is None:
            self._spawn()
        assert self._proc is not None
        if not self._ready:
            if self._read_line(START_TIMEOUT_S) != b"ready":
                self._stop()
                raise BastionError(f"reward 'math': its math-verify worker did not start within "
                                   f"{START_TIMEOUT_S:.0f} s (is math-verify installed?)")
            self._ready = True
        return self._proc

    def _read_line(self, timeout_s: float) -> bytes | None:
        """One line from the worker, or None at the deadline or if it exited."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.strip()

    def _stop(self) -> None:
        if self._proc is not None:
            _kill(self._proc)
            self._proc = None


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


__all__ = ["MathVerifier"]
