"""The image for real: build the Dockerfile's cpu target with a container engine, run it as a
user would (read-only root filesystem, tmpfs /tmp, no capabilities, the checkpoint and the key
file mounted read-only), then /health, the image's own HEALTHCHECK, a completion with the
key, 401 without it, the user, and a graceful stop. Slow (a build: minutes); skipped, saying
why, where no engine can build and run containers.

Environment (all optional):
  BASTION_CONTAINER_ENGINE  the engine command, e.g. "podman" or "docker" (default: the first
                            of podman, docker whose `info` answers)
  BASTION_TEST_BASE_IMAGE   the base instead of the pinned python image, where no registry is
                            reachable: deploy/local-base.sh builds one from the Debian mirror
  BASTION_TEST_WHEELS       a folder of wheels for an offline build (make image-wheels)
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_base_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/bastion-test:cpu"
IMAGE_UID = 10001
BUILD_TIMEOUT_S = 3600  # a cold build downloads and installs torch and every dependency


def _run(cmd: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _engine() -> list[str]:
    """The first engine that answers `info`; skips with each candidate's reason otherwise."""
    chosen = os.environ.get("BASTION_CONTAINER_ENGINE")
    candidates = [shlex.split(chosen)] if chosen else [[name] for name in ("podman", "docker")]
    reasons = []
    for engine in candidates:
        if shutil.which(engine[0]) is None:
            reasons.append(f"{engine[0]}: not installed")
            continue
        result = _run([*engine, "info"], timeout=60)
        if result.returncode == 0:
            return engine
        reasons.append(f"{engine[0]}: `info` failed: {(result.stderr or result.stdout).strip()[-300:]}")
    pytest.skip("no container engine can run here: " + "; ".join(reasons))


@pytest.fixture(scope="module")
def engine():
    return _engine()


@pytest.fixture(scope="module")
def image(engine):
    args = [*engine, "build", "--target", "cpu", "-t", IMAGE]
    if Path(engine[0]).name == "podman":
        args += ["--format", "docker"]  # the OCI format has no HEALTHCHECK
    if os.environ.get("BASTION_TEST_BASE_IMAGE"):
        args += ["--build-arg", f"PYTHON_IMAGE={os.environ['BASTION_TEST_BASE_IMAGE']}"]
    if os.environ.get("BASTION_TEST_WHEELS"):
        args += ["--build-context", f"wheels={os.environ['BASTION_TEST_WHEELS']}"]
    result = _run([*args, str(ROOT)], timeout=BUILD_TIMEOUT_S)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(s in output for s in ("pinging container registry", "no such host", "initializing source docker://",
                                     "failed to resolve source metadata", "pull access denied")):
            errors = [line for line in output.splitlines() if "rror" in line] or [output.strip()[-400:]]
            pytest.skip("the base image cannot be pulled here (set BASTION_TEST_BASE_IMAGE, deploy/local-base.sh): "
                        + errors[-1][-400:])
        runtime = [line for line in output.splitlines()
                   if re.search(r"OCI (runtime error|permission denied)|error running container: from \S+ creating", line)]
        if runtime:  # the engine cannot start the build's RUN containers: this machine, not the image
            pytest.skip("this engine cannot run containers here (see docs/serving.md, Container): " + runtime[-1][-400:])
        pytest.fail("the image does not build:\n" + output[-4000:])
    probe = _run([*engine, "run", "--rm", "--entrypoint", "true", IMAGE], timeout=120)
    if probe.returncode != 0:
        pytest.skip("this engine builds but cannot run containers here: " + probe.stderr.strip()[-400:])
    return IMAGE


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A checkpoint folder and a key file, owned by the image's user as the compose example
    asks (bastion writes both readable by their owner only)."""
    from bastion.serve.keys import add_key

    root = tmp_path_factory.mktemp("container")
    checkpoint = make_base_checkpoint(root / "run", seed=1)
    (root / "secrets").mkdir()
    _, key = add_key(root / "secrets" / "keys.json", "container-test")
    if os.geteuid() == 0:
        for path in [checkpoint, root / "secrets", *checkpoint.rglob("*"), *(root / "secrets").iterdir()]:
            os.chown(path, IMAGE_UID, IMAGE_UID)
    return checkpoint, root / "secrets" / "keys.json", key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _container(engine, image, checkpoint, key_file):
    port = _free_port()
    name = f"bastion-test-{os.getpid()}-{port}"
    args = [*engine, "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp:rw,size=256m,mode=1777",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-p", f"127.0.0.1:{port}:8000",
            "-v", f"{checkpoint}:/model:ro", "-v", f"{key_file}:/run/secrets/bastion_keys:ro", image]
    started = _run(args, timeout=300)
    assert started.returncode == 0, started.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # torch import and the manifest check on a loaded machine
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            state = json.loads(_run([*engine, "inspect", name]).stdout)[0]["State"]
            assert state["Running"], _run([*engine, "logs", name]).stderr[-3000:]
            assert time.monotonic() < deadline, "no /health within 180 s:\n" + _run([*engine, "logs", name]).stderr[-3000:]
            time.sleep(0.5)
        yield name, url
    finally:
        _run([*engine, "rm", "-f", name], timeout=120)


@pytest.fixture(scope="module")
def served(engine, image, deployment):
    checkpoint, key_file, key = deployment
    with _container(engine, image, checkpoint, key_file) as (name, url):
        yield name, url, key


def test_health_and_a_completion(served):
    _, url, key = served
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401  # bound to 0.0.0.0: keys required
    auth = {"Authorization": f"Bearer {key}"}
    models = httpx.get(url + "/v1/models", headers=auth, timeout=10).json()
    model = models["data"][0]["id"]
    response = httpx.post(url + "/v1/completions", headers=auth, timeout=120,
                          json={"model": model, "prompt": "reverse: a b c", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)
    wrong = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer bst_" + "x" * 43}, timeout=10,
                       json={"model": model, "prompt": "a"})
    assert wrong.status_code == 401


def test_image_healthcheck_passes(engine, served):
    name, _, _ = served
    info = json.loads(_run([*engine, "image", "inspect", IMAGE]).stdout)[0]
    healthcheck = info["Config"].get("Healthcheck") or info.get("Healthcheck")  # docker's place, podman's
    test = healthcheck["Test"]
    assert test[0] == "CMD"
    result = _run([*engine, "exec", name, *test[1:]], timeout=60)  # the image's own probe, run in the container
    assert result.returncode == 0, result.stderr


def test_runs_as_the_unprivileged_user_on_a_read_only_root(engine, served):
    name, _, key = served
    assert _run([*engine, "exec", name, "id", "-u"]).stdout.strip() == str(IMAGE_UID)
    write = _run([*engine, "exec", name, "python3", "-c", "open('/opt/bastion/x', 'w')"])
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    tmp = _run([*engine, "exec", name, "python3", "-c", "open('/tmp/x', 'w').write('ok')"])
    assert tmp.returncode == 0, tmp.stderr
    logs = _run([*engine, "logs", name])
    assert key not in logs.stdout + logs.stderr


def test_sigterm_stops_gracefully(engine, image, deployment):
    checkpoint, key_file, _ = deployment
    with _container(engine, image, checkpoint, key_file) as (name, _):
        stopped = _run([*engine, "stop", "-t", "60", name], timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        state = json.loads(_run([*engine, "inspect", name]).stdout)[0]["State"]
        assert state["ExitCode"] == 0, _run([*engine, "logs", name]).stderr[-2000:]


def test_missing_key_file_is_refused_with_a_clear_error(engine, image, deployment):
    checkpoint, _, _ = deployment
    result = _run([*engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "-v", f"{checkpoint}:/model:ro", image],
                  timeout=300)
    assert result.returncode != 0
    assert "API key file not found: /run/secrets/bastion_keys" in result.stderr
