"""The code sandbox: correct code passes, wrong code fails, and every hostile completion is
contained, scores 0, leaves the trainer alive with its environment unchanged, and leaves
nothing behind (no temp dir, no process of a sandbox uid, no file outside its directory).

Limits are small (256 MiB, 2 s CPU, a few seconds of wall clock) so that a containment bug
cannot take the machine down with it. The hostile table needs the "full" isolation (Linux,
root); elsewhere it is skipped and the refusal tests run instead."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from bastion.errors import ConfigError, DataError
from bastion.rewards import build_rewards, Sample
from bastion.rewards import sandbox
from bastion.rewards.sandbox import (
    Isolation, SandboxLimits, SandboxUnavailableError, extract_code, run_many, run_python,
)

# allow_network_fallback only matters off "full" isolation, where only the benign tests run.
LIMITS = SandboxLimits(timeout_seconds=8, cpu_seconds=2, memory_mb=256, max_processes=16, max_output_bytes=64 * 1024,
                       allow_network_fallback=True)
STRICT = SandboxLimits(timeout_seconds=8, cpu_seconds=2, memory_mb=256)
SECRET = "bastion-test-secret-5f1c9a"
FULL = sandbox.isolation().mode == "full"
needs_full = pytest.mark.skipif(not FULL, reason=f"needs full isolation: {sandbox.isolation().missing}")


def _can_run() -> str:
    try:
        run_python("x = 1", "assert x == 1", LIMITS)
    except SandboxUnavailableError as exc:
        return str(exc)
    return ""


runs = pytest.mark.skipif(bool(_can_run()), reason=f"no sandbox here: {_can_run()}")


def sandbox_processes() -> list[int]:
    """Pids run by any sandbox uid (one scan of /proc)."""
    uids = range(sandbox.UID_BASE, sandbox.UID_BASE + sandbox.UID_SLOTS)
    found = []
    for entry in os.scandir("/proc"):
        try:
            status = Path(entry.path, "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:"):
                if int(line.split()[1]) in uids:
                    found.append(int(entry.name))
                break
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bastion-sandbox-*") if p.name != f"bastion-sandbox-{os.geteuid()}"}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch):
    """Around every test: the trainer's env and process group are untouched, and no temp dir
    or sandbox process survives the test."""
    monkeypatch.setenv("BASTION_TEST_SECRET", SECRET)
    env, dirs = _env(), sandbox_dirs()
    yield
    assert _env() == env
    assert os.getpgid(0) == os.getpgrp()  # our process group still exists (and so do we)
    assert sandbox_dirs() - dirs == set()
    assert sandbox_processes() == []


# -- ordinary scoring ----------------------------------------------------------------------------

@runs
def test_correct_solution_passes():
    result = run_python("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], LIMITS)
    assert (result.passed, result.status, result.tests_passed, result.tests_total) == (True, "passed", 2, 2)


@runs
def test_wrong_solution_fails_and_counts_tests():
    result = run_python("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], LIMITS)
    assert (result.passed, result.status, result.tests_passed, result.tests_total) == (False, "failed", 1, 2)
    assert "test 0 failed: AssertionError" in result.output


@runs
def test_one_string_of_asserts_is_one_test():
    result = run_python("x = 3", "assert x == 3\nassert x > 2\n", LIMITS)
    assert (result.status, result.tests_passed, result.tests_total) == ("passed", 1, 1)


@runs
@pytest.mark.parametrize("code", ["def f(:\n", "raise SystemExit(0)", "import os\nos._exit(0)",
                                  'print(\'{"status": "passed", "passed": 1, "total": 1}\')\nimport os\nos._exit(0)'])
def test_broken_or_report_forging_code_fails(code):
    """A syntax error fails; exiting early or printing a fake report does not score."""
    result = run_python(code, "assert False", LIMITS)
    assert result.status == "failed" and not result.passed


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nand\n```py\nx = 2\n```\nbye") == "x = 2\n"
    assert extract_code("```\nx = 3\n```") == "x = 3\n"
    assert extract_code("```python\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_code("x = 4") == "x = 4"


@pytest.mark.parametrize("tests", [None, 3, [], ["ok", 5], "x" * (sandbox.MAX_TESTS_BYTES + 1),
                                   ["assert True"] * (sandbox.MAX_TESTS + 1)])
def test_bad_or_huge_tests_are_refused_before_running(tests):
    with pytest.raises(DataError, match="tests"):
        run_python("x = 1", tests, LIMITS)


@runs
def test_huge_code_scores_zero_without_running():
    result = run_python("#" * (sandbox.MAX_CODE_BYTES + 1), "assert True", LIMITS)
    assert (result.status, result.passed, result.seconds) == ("error", False, 0.0)


def test_limits_are_bounded():
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=10**9)


@runs
def test_parallel_runs_keep_order():
    jobs = [(f"v = {i}", f"assert v == {i if i % 2 else -1}") for i in range(6)]
    results = run_many(jobs, LIMITS, max_workers=3)
    assert [r.passed for r in results] == [bool(i % 2) for i in range(6)]


# -- the reward ----------------------------------------------------------------------------------

@runs
def test_code_tests_reward_scores_batches():
    common = {"name": "code_tests", "timeout_seconds": 8, "cpu_seconds": 1, "memory_mb": 256, "allow_network_fallback": not FULL}
    rewards = build_rewards([{**common, "max_workers": 2}])
    partial = build_rewards([{**common, "partial_credit": True}])
    tests = {"tests": ["assert f(1) == 2", "assert f(2) == 4"]}
    samples = [Sample("```python\ndef f(x):\n    return 2 * x\n```", tests), Sample("def f(x):\n    return x + 1", tests),
               Sample("while True: pass", tests)]
    assert rewards.score(samples)[0] == [1.0, 0.0, 0.0]
    assert partial.score(samples[:2])[0] == [1.0, 0.5]


@pytest.mark.parametrize("record,match", [({}, 'no "tests" field'), ({"tests": {"a": 1}}, 'field "tests"')])
def test_code_tests_reward_names_the_missing_field(record, match):
    rewards = build_rewards([{"name": "code_tests"}])
    with pytest.raises(DataError, match=match):
        rewards.score([Sample("x = 1", record)])


def test_code_tests_params_are_bounded():
    with pytest.raises(ConfigError, match="max_workers"):
        build_rewards([{"name": "code_tests", "max_workers": 1000}])


# -- weaker platforms: refused unless the user opts in ----------------------------------------------

@pytest.mark.parametrize("mode", ["uid", pytest.param("none", marks=pytest.mark.skipif(
    os.geteuid() == 0, reason="as root 'none' is refused outright (next test)"))])
def test_weaker_isolation_is_refused_without_opt_in(monkeypatch, mode):
    monkeypatch.setattr(sandbox, "_isolation", Isolation(mode, "namespaces unavailable (simulated)"))
    with pytest.raises(SandboxUnavailableError, match="allow_network_fallback"):
        run_python("x = 1", "assert x == 1", STRICT)


def test_no_isolation_as_root_is_refused_even_with_opt_in(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("root only")
    monkeypatch.setattr(sandbox, "_isolation", Isolation("none", "simulated"))
    with pytest.raises(SandboxUnavailableError, match="as root"):
        run_python("x = 1", "assert x == 1", SandboxLimits(allow_network_fallback=True))


@needs_full
def test_uid_mode_with_opt_in_still_contains_processes_and_secrets(monkeypatch, tmp_path):
    """The degraded mode of a root container without CAP_SYS_ADMIN, run for real: no
    namespaces, but its own uid, limits, scrubbed env and the sweep of the uid's processes."""
    monkeypatch.setattr(sandbox, "_isolation", Isolation("uid", "simulated"))
    limits = SandboxLimits(timeout_seconds=8, cpu_seconds=2, memory_mb=256, allow_network_fallback=True)
    if sandbox.private_ancestor(os.path.realpath(sys.executable)):
        with pytest.raises(SandboxUnavailableError, match="cannot enter"):  # e.g. pyenv under /root
            run_python("x = 1", "assert x == 1", limits)
        public = shutil.which("python3", path="/usr/bin:/bin")
        if not public or sandbox.private_ancestor(os.path.realpath(public)):
            pytest.skip("no interpreter other users can run")
        monkeypatch.setattr(sys, "executable", public)  # the stdlib-only launcher and runner run on any 3.8+
    assert run_python("def f():\n    return 1", "assert f() == 1", limits).passed
    secret = _secret_file(tmp_path)
    code = (f"import os, subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            f"seen = os.environ.get('BASTION_TEST_SECRET')\ntry:\n    seen = open({str(secret)!r}).read()\n"
            "except OSError:\n    pass\nwhile True:\n    os.fork()\n")
    result = run_python(code, "assert seen", limits)
    assert result.status == "failed" and "BlockingIOError" in result.detail
    assert SECRET not in result.output + result.detail


# -- the hostile table ----------------------------------------------------------------------------

def _secret_file(root: Path) -> Path:
    """A private key of the trainer's user: a 0600 file in a 0700 directory."""
    folder = root / "dot-ssh"
    folder.mkdir(mode=0o700)
    key = folder / "id_rsa"
    key.write_text(SECRET)
    key.chmod(0o600)
    return key


def _visible_private_dir() -> Path | None:
    """A 0700 directory at a path the sandbox can see (/run is not hidden), so that reading it
    is stopped by the uid, not by the path being absent."""
    try:
        return Path(tempfile.mkdtemp(prefix="bastion-sandbox-test-", dir="/run"))
    except OSError:
        return None


@needs_full
def test_fork_bomb_is_capped():
    result = run_python("import os\nwhile True:\n    os.fork()\n", "assert bombed", LIMITS)
    assert (result.status, result.passed) == ("failed", False)
    assert "BlockingIOError" in result.detail  # the cap, not the clock, stopped it


@needs_full
def test_infinite_loop_hits_the_cpu_limit():
    result = run_python("while True:\n    pass\n", "assert True", LIMITS)
    assert (result.status, result.passed) == ("timeout", False)


@needs_full
def test_sleeping_code_hits_the_wall_clock():
    result = run_python("import time\ntime.sleep(1000)\n", "assert True", SandboxLimits(timeout_seconds=1, memory_mb=256))
    assert (result.status, result.passed) == ("timeout", False)
    assert "wall clock" in result.detail


@needs_full
def test_ten_gigabytes_are_refused():
    result = run_python("x = bytearray(10 * 1024**3)\n", "assert len(x) > 0", LIMITS)
    assert (result.status, result.passed) == ("memory", False)


@needs_full
def test_trainer_private_files_are_unreadable(tmp_path):
    paths = [_secret_file(tmp_path)]  # under /tmp: hidden by the sandbox's own /tmp
    visible = _visible_private_dir()
    if visible:
        paths.append(_secret_file(visible))  # visible path, 0700 directory of another uid
    home_key = Path(os.path.expanduser("~"), ".ssh", "id_rsa")
    code = "seen = []\nfor p in %r:\n    try:\n        seen.append(open(p).read())\n    except OSError as e:\n" \
           "        print(p, type(e).__name__)\n" % [str(p) for p in [*paths, home_key]]
    try:
        result = run_python(code, "assert seen", LIMITS)
    finally:
        if visible:
            shutil.rmtree(visible)
    assert (result.status, result.passed) == ("failed", False)
    assert SECRET not in result.output + result.detail
    if visible:
        assert f"{paths[1]} PermissionError" in result.output


@needs_full
def test_environment_secrets_do_not_reach_the_code():
    digest = hashlib.sha256(SECRET.encode()).hexdigest()  # the tests must not carry the secret either
    code = (f"import hashlib, os\nprint(dict(os.environ))\nfound = [v for v in os.environ.values()]\n"
            f"try:\n    found.append(open('/proc/{os.getpid()}/environ').read())\nexcept OSError as e:\n"
            "    print('environ', type(e).__name__)\n")
    result = run_python(code, f"import hashlib\nassert any({digest!r} in hashlib.sha256(v.encode()).hexdigest() "
                              "or 'BASTION_TEST_SECRET' in v for v in found)", LIMITS)
    assert (result.status, result.passed) == ("failed", False)
    assert SECRET not in result.output + result.detail
    assert "'HOME': '/tmp'" in result.output and "BASTION_TEST_SECRET" not in result.output


@needs_full
def test_writing_outside_the_sandbox_fails_and_leaves_nothing(tmp_path):
    home = Path(os.path.expanduser("~"))
    blocked = [tmp_path / "pwned", Path.cwd() / "pwned-by-sandbox", home / "pwned-by-sandbox", Path("/var/tmp/pwned-by-sandbox")]
    private = [Path("/tmp/pwned-by-sandbox"), Path("/dev/shm/pwned-by-sandbox")]  # the sandbox's own tmpfs
    code = ("written = []\nfor p in %r:\n    try:\n        open(p, 'w').write('x')\n        written.append(p)\n"
            "    except OSError as e:\n        print(p, type(e).__name__)\n" % [str(p) for p in blocked + private])
    result = run_python(code, "assert written == %r" % [str(p) for p in blocked + private], LIMITS)
    assert (result.status, result.passed) == ("failed", False)
    assert not [p for p in blocked + private if p.exists()]
    for path in blocked:
        assert str(path) in result.output  # each write was refused (and said why)


@needs_full
def test_network_is_unreachable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = ("import socket\nconnected = False\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    connected = True\n"
                "except OSError as e:\n    print(type(e).__name__, e)\n")
        result = run_python(code, "assert connected", LIMITS)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert (result.status, result.passed) == ("failed", False)
    assert "unreachable" in result.output


@needs_full
def test_killing_the_trainer_fails():
    code = ("import os, signal\nkilled = []\n"
            f"for how in (lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill({os.getpid()}, signal.SIGKILL),\n"
            f"            lambda: os.killpg({os.getpgrp()}, signal.SIGKILL), lambda: os.killpg(os.getpgid(0), signal.SIGKILL),\n"
            "            lambda: os.kill(-1, signal.SIGKILL)):\n"
            "    try:\n        how()\n        killed.append(1)\n    except OSError as e:\n        print(type(e).__name__)\n")
    result = run_python(code, "assert not 'still here'", LIMITS)
    assert result.status in ("failed", "killed") and not result.passed
    os.kill(os.getpid(), 0)  # the trainer is alive (the fixture checks its group and env)


@needs_full
def test_detached_grandchild_does_not_survive():
    code = ("import subprocess\np = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "print('grandchild', p.pid)\n")
    result = run_python(code, "assert p.poll() is not None", LIMITS)
    assert (result.status, result.passed) == ("failed", False)
    assert "grandchild" in result.output
    assert sandbox_processes() == []  # the PID namespace took it down with the run


@needs_full
def test_output_flood_is_cut_off():
    code = "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
    result = run_python(code, "assert True", LIMITS)
    assert (result.status, result.passed) == ("killed", False)
    assert "output over" in result.detail and len(result.output.encode()) <= sandbox.OUTPUT_TAIL


@needs_full
def test_signals_from_the_code_cannot_escape_its_session():
    """Belt and braces for the kill test: the trainer ignores nothing, so a stray SIGINT or
    SIGTERM to our group would end this test run."""
    code = "import os, signal\nfor s in (signal.SIGINT, signal.SIGTERM):\n    try:\n        os.killpg(%d, s)\n" \
           "    except OSError as e:\n        print(type(e).__name__)\n" % os.getpgrp()
    result = run_python(code, "assert False", LIMITS)
    assert result.status == "failed"
    assert result.output.count("ProcessLookupError") + result.output.count("PermissionError") == 2
