"""Run untrusted Python (a policy's completion) against tests, contained.

`run_python(code, tests, limits)` runs one program in a fresh, isolated process and says
whether the tests passed; `run_many` runs a batch on a bounded number of threads, each
driving one sandboxed process. docs/alignment.md lists the guarantees, what each
hostile case does, the overhead, and which mechanisms need which privileges.

Isolation modes, chosen once per process by running a probe:
- "full" (Linux as root): new network, mount, PID, IPC and UTS namespaces, a dedicated
  unprivileged uid per concurrent run (61000-61127, RLIMIT_NPROC applies to it), private
  tmpfs /tmp and /dev/shm, the trainer's home hidden, resource limits, scrubbed environment.
- "uid" (root without CAP_SYS_ADMIN, e.g. a default Docker container): everything but the
  namespaces: the code can reach the network, and files it leaves in world-writable places
  (/tmp, /dev/shm) stay. Refused unless `allow_network_fallback`.
- "none" (not root, or not Linux): resource limits and a scrubbed environment only; the code
  runs as the trainer's user and can read its files. Refused unless `allow_network_fallback`,
  and refused as root whatever the flag.

The process chain is trainer -> launcher (fixed script, new session) -> runner (fixed
script, sandbox uid) which execs the solution and then the tests.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bastion.errors import BastionError, ConfigError, DataError

MAX_CODE_BYTES = 64 * 1024
MAX_TESTS_BYTES = 64 * 1024
MAX_TESTS = 256
OUTPUT_TAIL = 4096  # bytes of output kept in a result
REPORT_CAP = 4096  # bytes read from the runner's and the launcher's report pipes
UID_BASE, UID_SLOTS = 61000, 128
SWEEP_SECONDS = 5.0

Status = Literal["passed", "failed", "timeout", "memory", "killed", "error"]
Mode = Literal["full", "uid", "none"]

_HERE = Path(__file__).resolve().parent
_FENCE = re.compile(r"```[ \t]*(python3?|py)?[^\n`]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class SandboxError(BastionError):
    """The sandbox could not run a program (no free uid, a process that would not die)."""


class SandboxUnavailableError(SandboxError):
    """This platform cannot give the isolation asked for (see the message for what is missing)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandboxed run may use. Wall clock is enforced by the trainer (kill -9 of the
    whole session and PID namespace), CPU time, memory and the rest by the kernel."""

    timeout_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 64
    tmp_mb: int = 64  # size of the private /tmp (the working directory) in "full" mode
    allow_network_fallback: bool = False

    def __post_init__(self) -> None:
        bounds = {"timeout_seconds": (0.1, 600), "cpu_seconds": (1, 600), "memory_mb": (64, 65536),
                  "max_processes": (1, 1024), "max_output_bytes": (1024, 64 << 20),
                  "max_file_bytes": (0, 1 << 30), "max_open_files": (16, 4096), "tmp_mb": (1, 1024)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"sandbox limit {name}={value!r} must be between {low} and {high}",
                                  [(name, "out of range")])


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: Status
    tests_passed: int
    tests_total: int
    seconds: float
    output: str = ""  # the last OUTPUT_TAIL bytes of stdout+stderr
    detail: str = ""  # why it failed, in a few words


@dataclass(frozen=True)
class Isolation:
    mode: Mode
    missing: str  # what this mode lacks compared with "full", for error messages


def extract_code(completion: str) -> str:
    """The code in a completion: the last ```python (or ```py) fenced block; else the last
    fenced block of any language; else the whole completion."""
    blocks = _FENCE.findall(completion)
    tagged = [body for lang, body in blocks if lang]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else completion


def normalize_tests(tests: object, where: str = "tests") -> list[str]:
    """Accepted: a string of Python (asserts; one test) or a list of such strings (each one
    test, for partial credit). Anything else, or more than the limits, is a DataError."""
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: must be a string of Python asserts or a non-empty list of such strings, "
                        f"not {type(tests).__name__}")
    if len(tests) > MAX_TESTS:
        raise DataError(f"{where}: {len(tests)} tests, over the limit of {MAX_TESTS}")
    size = sum(len(t.encode("utf-8", "surrogatepass")) for t in tests)
    if size > MAX_TESTS_BYTES:
        raise DataError(f"{where}: {size} bytes of tests, over the limit of {MAX_TESTS_BYTES}")
    return tests


def run_python(code: str, tests: str | list[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code`, then `tests`, in a fresh sandboxed process (see the module docstring)."""
    limits = limits or SandboxLimits()
    return _run(code, normalize_tests(tests), limits, _allowed_isolation(limits))


def run_many(jobs: Sequence[tuple[str, str | list[str]]], limits: SandboxLimits | None = None,
             max_workers: int | None = None) -> list[SandboxResult]:
    """Run (code, tests) pairs, at most `max_workers` (default min(4, CPUs)) at a time."""
    limits = limits or SandboxLimits()
    prepared = [(code, normalize_tests(tests, f"tests[{i}]")) for i, (code, tests) in enumerate(jobs)]
    if not prepared:
        return []
    isolation = _allowed_isolation(limits)
    workers = max(1, min(max_workers or min(4, os.cpu_count() or 1), 32, len(prepared)))
    if workers == 1:
        return [_run(code, tests, limits, isolation) for code, tests in prepared]
    with ThreadPoolExecutor(workers, thread_name_prefix="bastion-sandbox") as pool:
        return list(pool.map(lambda job: _run(job[0], job[1], limits, isolation), prepared))


# -- isolation: which mode this platform allows, decided once by running probes ----------------------

_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def isolation() -> Isolation:
    """The strongest isolation this process can get (probed on first call, then cached)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
        return _isolation


def _probe() -> Isolation:
    if not sys.platform.startswith("linux"):
        return Isolation("none", f"{sys.platform} has no namespaces and no uid switch: no network isolation, "
                                 "the code runs as your user")
    if os.geteuid() != 0:
        return Isolation("none", "not running as root: no network/PID/mount namespaces and no separate uid, "
                                 "the code runs as your user and can read your files")
    limits = SandboxLimits(timeout_seconds=30, cpu_seconds=10, memory_mb=256)
    full = _run("", ["assert True"], limits, Isolation("full", ""))
    if full.passed:
        return Isolation("full", "")
    uid = _run("", ["assert True"], limits, Isolation("uid", ""))
    if uid.passed or private_ancestor(os.path.realpath(sys.executable)):
        return Isolation("uid", f"namespaces unavailable ({full.detail}): the code can reach the network "
                                "and leave files in /tmp and /dev/shm")
    raise SandboxUnavailableError(f"the sandbox cannot start here: {full.detail}; {uid.detail}")


def _allowed_isolation(limits: SandboxLimits) -> Isolation:
    found = isolation()
    if found.mode == "full":
        return found
    if found.mode == "none" and os.geteuid() == 0:
        raise SandboxUnavailableError(f"refusing to run untrusted code as root without isolation: {found.missing}")
    if not limits.allow_network_fallback:
        raise SandboxUnavailableError(f"code sandbox unavailable: {found.missing}. Set allow_network_fallback: "
                                      f"true to run with this weaker isolation ({found.mode!r} mode)")
    python = os.path.realpath(sys.executable)
    if found.mode == "uid" and private_ancestor(python):  # without a mount namespace it cannot be bound in
        raise SandboxUnavailableError(f"the interpreter {python} lies under {private_ancestor(python)}, which the "
                                      "sandbox uid cannot enter; install Python where other users can read it")
    return found


# -- one run ------------------------------------------------------------------------------------------

def _run(code: str, tests: list[str], limits: SandboxLimits, iso: Isolation) -> SandboxResult:
    start = time.monotonic()
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:  # generated text: a zero, not an error
        return SandboxResult(False, "error", 0, len(tests), 0.0, detail=f"code over {MAX_CODE_BYTES} bytes")
    with _uid_slot(iso.mode) as uid, _workdir(uid if iso.mode == "uid" else None) as workdir:
        nonce = secrets.token_hex(16)
        files = {"solution.py": code, "tests.json": json.dumps(tests), "nonce": nonce}
        for name, text in files.items():
            (workdir / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        if iso.mode == "uid":
            for name in files:
                os.chown(workdir / name, uid, uid)
        outcome = _launch(_launcher_config(iso.mode, uid, workdir, list(files), limits), limits)
        if iso.mode != "none":
            _sweep(uid)
    return _classify(outcome, nonce, len(tests), limits, time.monotonic() - start)


def _launcher_config(mode: Mode, uid: int, workdir: Path, files: list[str], limits: SandboxLimits) -> dict:
    cwd = "/tmp" if mode == "full" else str(workdir)
    python = os.path.realpath(sys.executable)
    nproc = limits.max_processes if mode != "none" else _own_task_count() + limits.max_processes
    return {
        "mode": mode, "uid": uid, "workdir": str(workdir), "files": files, "cwd": cwd, "python": python,
        "runner": (_HERE / "_sandbox_runner.py").read_text(encoding="utf-8"),
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd},
        "hide": _dirs_to_hide(python), "expose": os.path.realpath(sys.base_prefix),
        "cpu_seconds": limits.cpu_seconds, "memory_bytes": limits.memory_mb << 20, "nproc": nproc,
        "file_bytes": limits.max_file_bytes, "open_files": limits.max_open_files, "tmp_mb": limits.tmp_mb,
    }


def _dirs_to_hide(python: str) -> list[str]:
    """The trainer's home, and the first directory on the interpreter's path that others cannot
    enter (e.g. /root of a pyenv install): covered by a tmpfs; the interpreter is bound back."""
    hide = []
    home = os.path.realpath(os.path.expanduser("~"))
    if home != "/" and os.path.isdir(home):
        hide.append(home)
    private = private_ancestor(python)
    if private and not any(private == h or private.startswith(h + "/") for h in hide):
        hide.append(private)
    return hide


def private_ancestor(path: str) -> str | None:
    """The first directory on `path` that other users cannot enter, if any."""
    parts = Path(path).parent.parts
    for i in range(2, len(parts) + 1):
        folder = str(Path(*parts[:i]))
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


@dataclass
class _Outcome:
    reason: str = ""  # "timeout" | "output" when the trainer killed the run
    output: bytes = b""
    output_bytes: int = 0
    report: bytes = b""  # the runner's JSON line
    status: bytes = b""  # the launcher's JSON lines


def _launch(cfg: dict, limits: SandboxLimits) -> _Outcome:
    result_r, result_w = os.pipe()
    status_r, status_w = os.pipe()
    cfg.update(result_fd=result_w, status_fd=status_w)
    launcher = (_HERE / "_sandbox_launcher.py").read_text(encoding="utf-8")
    argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", launcher, json.dumps(cfg)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, cwd="/",
                                start_new_session=True, pass_fds=(result_w, status_w), close_fds=True)
    finally:
        os.close(result_w)
        os.close(status_w)
    try:
        return _collect(proc, result_r, status_r, limits)
    finally:
        _kill_session(proc)
        for fd in (result_r, status_r):
            os.close(fd)
        proc.stdout.close()


def _collect(proc: subprocess.Popen, result_r: int, status_r: int, limits: SandboxLimits) -> _Outcome:
    """Read output and reports until the launcher exits, the wall clock runs out, or the
    output passes its cap (then the caller kills the session)."""
    out = _Outcome()
    deadline = time.monotonic() + limits.timeout_seconds
    stdout = proc.stdout.fileno()
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    with selectors.DefaultSelector() as sel:
        for fd in (stdout, result_r, status_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    out.reason = "timeout"
                    break
                events = sel.select(remaining if pidfd is not None else min(remaining, 0.05))
                for key, _ in events:
                    if key.fd != pidfd:
                        _read_into(out, key.fd, stdout, result_r, sel)
                if out.output_bytes > limits.max_output_bytes:
                    out.reason = "output"
                    break
                if proc.poll() is not None:
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
    for fd in (stdout, result_r, status_r):  # what the run wrote just before it ended
        while _read_into(out, fd, stdout, result_r, None) and out.output_bytes <= limits.max_output_bytes:
            pass
    return out


def _read_into(out: _Outcome, fd: int, stdout: int, result_r: int, sel: selectors.BaseSelector | None) -> bool:
    try:
        chunk = os.read(fd, 65536)
    except (BlockingIOError, OSError):
        return False
    if not chunk:
        if sel is not None:
            sel.unregister(fd)
        return False
    if fd == stdout:
        out.output_bytes += len(chunk)
        out.output = (out.output + chunk)[-OUTPUT_TAIL:]
    elif fd == result_r:
        out.report = (out.report + chunk)[:REPORT_CAP]
    else:
        out.status = (out.status + chunk)[:REPORT_CAP]
    return True


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's whole session group. In "full" mode that also takes the PID
    namespace down: its init has the launcher's death as its own death signal."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _classify(out: _Outcome, nonce: str, total: int, limits: SandboxLimits, seconds: float) -> SandboxResult:
    tail = out.output.decode("utf-8", "replace")

    def result(status: Status, passed: int = 0, detail: str = "") -> SandboxResult:
        return SandboxResult(status == "passed", status, passed, total, round(seconds, 4), tail, detail)

    if out.reason == "timeout":
        return result("timeout", detail=f"wall clock over {limits.timeout_seconds} s")
    if out.reason == "output":
        return result("killed", detail=f"output over {limits.max_output_bytes} bytes")
    launcher = _json_lines(out.status)
    setup = [line["setup_error"] for line in launcher if "setup_error" in line]
    if setup:
        return result("error", detail=f"sandbox setup failed: {setup[0]}"[:300])
    report = next(iter(_json_lines(out.report)), {})
    if report.get("nonce") == nonce and report.get("status") in ("passed", "failed", "memory"):
        passed = report.get("passed")
        passed = passed if isinstance(passed, int) and 0 <= passed <= total else 0
        return result(report["status"], passed, str(report.get("detail", ""))[:300])
    ended = next((line for line in launcher if "exit" in line), None)
    if ended is None:
        return result("killed", detail="the launcher ended without a report")
    code, cpu = ended.get("exit"), ended.get("cpu", 0)
    # The kernel's SIGKILL at RLIMIT_CPU; rusage rounds CPU time down a little, hence the 0.9.
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and isinstance(cpu, (int, float))
                                   and cpu >= 0.9 * limits.cpu_seconds):
        return result("timeout", detail=f"CPU time over {limits.cpu_seconds} s")
    if isinstance(code, int) and code < 0:
        return result("killed", detail=f"killed by signal {-code}")
    return result("failed", detail=f"exited with status {code} before reporting")


def _json_lines(data: bytes) -> list[dict]:
    found = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


# -- uids, working directories, sweeping --------------------------------------------------------------

_quarantined: set[int] = set()  # uids with a process that would not die: never handed out again
_held_locks: list[int] = []  # their lock fds, kept open so no other trainer takes them either


@contextmanager
def _uid_slot(mode: Mode) -> Iterator[int]:
    """A sandbox uid no other run (in this or another process) is using, held for one run."""
    if mode == "none":
        yield os.getuid()
        return
    lock_dir = _lock_dir()
    for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
        if uid in _quarantined or _has_account(uid):
            continue
        fd = os.open(lock_dir / f"uid-{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _sweep(uid)  # left over from a trainer that crashed mid-run
            yield uid
        finally:
            if uid not in _quarantined:
                os.close(fd)
            else:
                _held_locks.append(fd)
        return
    raise SandboxError(f"all {UID_SLOTS} sandbox uids ({UID_BASE}-{UID_BASE + UID_SLOTS - 1}) are busy")


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True  # a real user's uid is never borrowed


def _lock_dir() -> Path:
    for path in (Path("/run/bastion-sandbox"), Path(tempfile.gettempdir()) / f"bastion-sandbox-{os.geteuid()}"):
        try:
            path.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            return path
    raise SandboxUnavailableError("no private directory for the sandbox's uid locks (/run/bastion-sandbox)")


@contextmanager
def _workdir(owner: int | None) -> Iterator[Path]:
    """A private (0700) temporary directory, removed afterwards whatever it holds."""
    path = Path(tempfile.mkdtemp(prefix="bastion-sandbox-"))
    try:
        if owner is not None:
            os.chown(path, owner, owner)
        yield path
    finally:
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    def make_writable(func, target, _exc) -> None:  # the code may have left 0000 directories
        for p in (os.path.dirname(target), target):
            try:
                os.chmod(p, 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
        func(target)

    shutil.rmtree(path, onerror=make_writable)


def processes_of(uid: int) -> list[int]:
    """Pids whose real or effective uid is `uid` (Linux /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        real, effective = line.split()[1:3]
                        if uid in (int(real), int(effective)):
                            pids.append(int(entry.name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _sweep(uid: int) -> None:
    """Kill every process of a sandbox uid until none is left. In "full" mode the PID
    namespace is already gone by now; this is the check, and the mechanism in "uid" mode."""
    deadline = time.monotonic() + SWEEP_SECONDS
    while pids := processes_of(uid):
        if time.monotonic() > deadline:
            _quarantined.add(uid)
            raise SandboxError(f"sandbox uid {uid}: processes {pids[:5]} survived SIGKILL for {SWEEP_SECONDS} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)  # SIGKILLed processes need a moment to be reaped


def _own_task_count() -> int:
    """Tasks (threads count) of this uid: RLIMIT_NPROC counts them all, so in "none" mode the
    cap is this many plus max_processes."""
    uid, total = os.getuid(), 0
    if not os.path.isdir("/proc"):
        return 4096
    for pid in processes_of(uid):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith(b"Threads:")), 1)
        except (OSError, ValueError):
            continue
    return total


__all__ = ["Isolation", "SandboxError", "SandboxLimits", "SandboxResult", "SandboxUnavailableError",
           "extract_code", "isolation", "normalize_tests", "processes_of", "run_many", "run_python"]
