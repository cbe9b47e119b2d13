"""Turn SIGINT/SIGTERM into a request to stop after the current step (then save, exit 0)."""
from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set `requested` instead of killing.
    A second SIGINT falls back to the default behaviour so a stuck run can still be killed."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
