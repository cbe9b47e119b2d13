"""The container image's security properties as checks over the parsed files: Dockerfile
(BuildKit's own parser, through the `dockerfile` package), .dockerignore and the compose file.
Each check returns a list of problems (empty: the file passes), so tests can also show that
a file breaking a rule is caught."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import dockerfile

DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
# Names a secret would go by. A build ARG or ENV holding one is written into the image's
# history or config, readable by anyone who can pull the image.
SECRET_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
OFFICIAL_PYTHON_RE = re.compile(r"^(docker\.io/)?(library/)?python:[^@]*slim[^@]*@sha256:[0-9a-f]{64}$")
ROOT_USERS = {"", "0", "root"}
WRITABLE_ENV = ("HOME", "TMPDIR", "XDG_CACHE_HOME")  # must point into the /tmp tmpfs


@dataclass
class Stage:
    name: str
    base: str  # image reference with build args expanded, or a previous stage's name
    parent: Stage | None = None
    commands: list = field(default_factory=list)

    def chain(self) -> list:
        """Commands in effect in this stage: its parents' (stage FROMs) first."""
        return (self.parent.chain() if self.parent else []) + self.commands


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def _env_pairs(command) -> list[tuple[str, str]]:  # noqa: ANN001 - a dockerfile.Command
    values = command.value
    return list(zip(values[0::2], values[1::2]))


def parse_stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_string(text):
        if command.cmd == "ARG" and not stages:
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
        elif command.cmd == "FROM":
            base = _expand(command.value[0], global_args)
            name = command.value[2] if len(command.value) >= 3 else str(len(stages))
            parent = next((s for s in stages if s.name == base), None)
            stages.append(Stage(name, base, parent))
        elif stages:
            stages[-1].commands.append(command)
        else:
            raise ValueError(f"line {command.start_line}: {command.cmd} before the first FROM")
    return stages


def _leaf_stages(stages: list[Stage]) -> list[Stage]:
    """Stages nothing else builds on or copies from: the images a user runs (targets)."""
    used = {s.base for s in stages}
    for stage in stages:
        for command in stage.commands:
            used.update(f.split("=", 1)[1] for f in command.flags if f.startswith("--from="))
            used.update(m.group(1) for f in command.flags for m in [re.search(r"from=([\w.-]+)", f)] if m)
    return [s for s in stages if s.name not in used]


def dockerfile_problems(text: str) -> list[str]:
    stages = parse_stages(text)
    names = {s.name for s in stages}
    problems = []
    for stage in stages:
        if stage.base != "scratch" and stage.base not in names:
            if not DIGEST_RE.search(stage.base):
                problems.append(f"stage {stage.name}: base {stage.base!r} is not pinned by digest")
            elif not OFFICIAL_PYTHON_RE.match(stage.base):
                problems.append(f"stage {stage.name}: base {stage.base!r} is not the official slim Python image")
        problems += _command_problems(stage)
    leaves = _leaf_stages(stages)
    if not leaves:
        problems.append("no target stage")
    for leaf in leaves:
        problems += _target_problems(leaf)
    return problems


def _command_problems(stage: Stage) -> list[str]:
    problems = []
    for command in stage.commands:
        where = f"stage {stage.name}, line {command.start_line}"
        if command.cmd == "ADD":
            problems.append(f"{where}: ADD (fetches URLs, unpacks archives): use COPY")
        if command.cmd in ("ENV", "ARG"):
            names = [n for n, _ in _env_pairs(command)] if command.cmd == "ENV" else [command.value[0].split("=")[0]]
            problems += [f"{where}: {command.cmd} {n} looks like a secret baked into the image"
                         for n in names if SECRET_NAME_RE.search(n)]
        if command.cmd == "COPY" and not any(f.startswith("--from=") for f in command.flags):
            sources = command.value[:-1]
            if any(src.strip("./") in ("", "*") for src in sources):
                problems.append(f"{where}: COPY of the whole build context")
        if command.cmd == "RUN" and "pip install" in " ".join(command.value):
            env = dict(p for c in stage.chain() if c.cmd == "ENV" for p in _env_pairs(c))
            if "--no-cache-dir" not in " ".join(command.value) and env.get("PIP_NO_CACHE_DIR") not in ("1", "true"):
                problems.append(f"{where}: pip install keeps its cache in the image")
    return problems


def _target_problems(leaf: Stage) -> list[str]:
    chain = leaf.chain()
    problems = []
    users = [c.value[0] for c in chain if c.cmd == "USER"]
    user = users[-1].split(":")[0] if users else ""
    if user in ROOT_USERS:
        problems.append(f"target {leaf.name}: runs as root (no USER, or USER {users[-1] if users else ''!s})")
    env = dict(p for c in chain if c.cmd == "ENV" for p in _env_pairs(c))
    for name in WRITABLE_ENV:
        if not env.get(name, "").startswith("/tmp"):
            problems.append(f"target {leaf.name}: {name} is not under /tmp (read-only root filesystem)")
    checks = [c for c in chain if c.cmd == "HEALTHCHECK"]
    if not checks or checks[-1].value[0] != "CMD":
        problems.append(f"target {leaf.name}: no HEALTHCHECK")
    else:
        probe = " ".join(checks[-1].value[1:])
        # the URL is in the command, or in an environment variable the command reads
        referenced = re.findall(r"environ(?:\.get\(|\[)['\"](\w+)|\$\{?(\w+)", probe)
        url = " ".join([probe] + [env.get(a or b, "") for a, b in referenced])
        if "/health" not in url:
            problems.append(f"target {leaf.name}: HEALTHCHECK does not probe /health")
        if re.search(r"\b(curl|wget)\b", probe):
            problems.append(f"target {leaf.name}: HEALTHCHECK uses a tool the slim image lacks")
    entry = [c for c in chain if c.cmd == "ENTRYPOINT"]
    if not entry or not entry[-1].json or list(entry[-1].value[:2]) != ["bastion", "serve"]:
        problems.append(f"target {leaf.name}: ENTRYPOINT is not [\"bastion\", \"serve\"] in exec form")
    return problems


def target_cmd(text: str, target: str) -> list[str]:
    """The CMD (arguments to `bastion serve`) a target stage runs with."""
    stage = next(s for s in parse_stages(text) if s.name == target)
    return list([c for c in stage.chain() if c.cmd == "CMD"][-1].value)


def dockerignore_problems(text: str, copied: list[str]) -> list[str]:
    """The context must be an allowlist: everything ignored (`*` first), then only the paths
    the Dockerfile copies re-included."""
    patterns = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    problems = []
    if not patterns or patterns[0] != "*":
        problems.append(".dockerignore does not start by ignoring everything ('*')")
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for path in included:
        if path not in copied:
            problems.append(f".dockerignore lets {path!r} into the build context, which no COPY uses")
    for path in copied:
        if path not in included:
            problems.append(f"COPY {path} is not let through by .dockerignore")
    return problems


def context_sources(text: str) -> list[str]:
    """Every path COPY takes from the build context."""
    return [src.rstrip("/") for stage in parse_stages(text) for c in stage.commands
            if c.cmd == "COPY" and not any(f.startswith("--from=") for f in c.flags) for src in c.value[:-1]]


def compose_problems(doc: dict, stage_names: set[str]) -> list[str]:
    problems = []
    for name, service in (doc.get("services") or {}).items():
        where = f"service {name}"
        if service.get("read_only") is not True:
            problems.append(f"{where}: root filesystem not read-only")
        user = str(service.get("user", "")).split(":")[0]
        if user in ROOT_USERS:
            problems.append(f"{where}: runs as root")
        if "ALL" not in (service.get("cap_drop") or []):
            problems.append(f"{where}: capabilities not dropped")
        if not any(str(o).startswith("no-new-privileges") for o in service.get("security_opt") or []):
            problems.append(f"{where}: no-new-privileges not set")
        if not any(str(t).startswith("/tmp") for t in service.get("tmpfs") or []):
            problems.append(f"{where}: no tmpfs for /tmp")
        environment = service.get("environment") or {}
        names = environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
        problems += [f"{where}: {n} in environment (use the secret)" for n in names if SECRET_NAME_RE.search(n)]
        secrets = [s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets") or []]
        command = [str(a) for a in service.get("command") or []]
        key_file = command[command.index("--key-file") + 1] if "--key-file" in command else None
        if key_file is None or key_file.removeprefix("/run/secrets/") not in secrets:
            problems.append(f"{where}: --key-file is not a mounted secret")
        volumes = [v for v in service.get("volumes") or [] if isinstance(v, dict)]
        if not volumes or not all(v.get("read_only") for v in volumes):
            problems.append(f"{where}: model volume not read-only")
        target = (service.get("build") or {}).get("target")
        if target not in stage_names:
            problems.append(f"{where}: build target {target!r} is not a Dockerfile stage")
        for port in service.get("ports") or []:
            if not str(port).startswith(("127.0.0.1:", "[::1]:")):
                problems.append(f"{where}: port {port} published on every interface of the host")
    return problems
