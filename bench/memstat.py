"""Process memory from /proc/self/status (Linux), shared by the benchmarks."""
from __future__ import annotations


def status_bytes(key: str) -> int:
    """A /proc/self/status size in bytes: "VmRSS" (resident now) or "VmHWM" (peak resident)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (so an earlier peak, e.g. loading, is not counted)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
