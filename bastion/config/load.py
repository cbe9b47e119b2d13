"""Load a config: YAML file -> ${ENV} interpolation -> --set overrides -> presets -> validation.

Secrets: any value interpolated from an environment variable whose name looks secret
(TOKEN, SECRET, PASSWORD, KEY, ...) is remembered and redacted wherever the config is
printed, logged or raised in an error. Validation errors never echo input values.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.config.presets import PRESETS
from bastion.config.schema import BastionConfig
from bastion.errors import ConfigError

MAX_CONFIG_BYTES = 1 * 2**20
REDACTED = "***REDACTED***"
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE)", re.I)
SECRET_FIELD = re.compile(r"(token|secret|password|passwd|credential|api_?key|access_?key|private_?key)$", re.I)
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)


MAX_YAML_DEPTH = 32  # a Bastion config is 3 levels deep
MAX_YAML_NODES = 10_000  # nodes as if every alias were expanded (a config has a few hundred)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with its nesting and its size bounded while the document is
    composed, before anything is built: a deeply nested document or an alias bomb (a few
    hundred bytes whose aliases expand to billions of nodes) stops at the limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = self._nodes = 0
        self._expanded: dict[int, int] = {}  # id(node) -> nodes it stands for

    def _count(self, n: int) -> None:
        self._nodes += n
        if self._nodes > MAX_YAML_NODES:
            raise _TooBig(f"more than {MAX_YAML_NODES} nodes (aliases expanded)")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self._expanded.get(id(node), 1))  # an alias costs what it stands for
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _TooBig(f"nested more than {MAX_YAML_DEPTH} levels deep")
        start = self._nodes
        self._count(1)
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._expanded[id(node)] = self._nodes - start
        return node


class _TooBig(yaml.YAMLError):
    pass


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document from a file, a checkpoint or the command line: the safe loader (no
    Python object tags), nesting and expanded size bounded. ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # security-reviewed: a SafeLoader subclass
    except _TooBig as exc:
        raise ConfigError(f"{where} is too large to load: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:  # a scalar its tag cannot hold: a 5,000-digit int, a 13th month
        raise ConfigError(f"{where} is not valid YAML: {str(exc)[:120]}") from None
    except RecursionError:  # (cannot happen below MAX_YAML_DEPTH; the last line of defence)
        raise ConfigError(f"{where} is nested too deeply") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a size limit and the bounded safe loader."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid UTF-8 (byte {exc.start})") from None
    data = parse_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def interpolate(node: Any, secrets: set[str], env: dict[str, str] | None = None, path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; `$${` escapes a literal `${`."""
    env = os.environ if env is None else env
    if isinstance(node, dict):
        return {k: interpolate(v, secrets, env, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, secrets, env, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(
                    f"{path or '<root>'}: environment variable {name} is not set (use ${{{name}:-default}} for a default)",
                    [(path, f"environment variable {name} is not set")],
                )
            value = default
        if SECRET_NAME.search(name) and value:
            secrets.add(value)
        return value

    result = _ENV_REF.sub(substitute, node)
    # A whole-string reference may hold a number or bool: parse it as a YAML scalar.
    if result != node and _ENV_REF.fullmatch(node) and result not in secrets:
        try:
            parsed = parse_yaml(result, f"{path}: environment variable")
        except ConfigError:
            return result
        if isinstance(parsed, (int, float, bool)):
            return parsed
    return result


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as a YAML scalar."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not keys or any(not k for k in keys):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = parse_yaml(raw, "override") if raw.strip() else ""
    except ConfigError:
        value = raw
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _expand_model_preset(data: dict[str, Any]) -> None:
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        name = model.pop("preset")
        if name not in PRESETS:
            raise ConfigError(
                f"model.preset: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}",
                [("model.preset", f"unknown preset {name!r}")],
            )
        data["model"] = {**PRESETS[name], **model}


def build_config(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config", *,
                 interpolate_env: bool = True) -> BastionConfig:
    """Validate a raw mapping (already read from YAML) into a BastionConfig. A config stored
    in a checkpoint is built with interpolate_env=False: its `${VAR}` text stays text, so a
    checkpoint from elsewhere can never pull a value out of this machine's environment."""
    secrets: set[str] = set()
    data = dict(data)
    for override in overrides:
        apply_override(data, override)
    if interpolate_env:
        data = interpolate(data, secrets)
    _expand_model_preset(data)
    try:
        config = BastionConfig.model_validate(data)
    except ValidationError as exc:
        problems = [(_location(err), _clean_message(err)) for err in exc.errors()]
        lines = "\n".join(f"  {loc}: {msg}" for loc, msg in problems)
        message = redact_text(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}", secrets)
        raise ConfigError(message, [(loc, redact_text(msg, secrets)) for loc, msg in problems]) from None
    config._secret_values = secrets
    return config


_LEADING_FIELD = re.compile(r"^([a-z_]+\.[a-z_]+) ")


def _location(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if not loc:  # a cross-section check; its message starts with the field it is about
        match = _LEADING_FIELD.match(_clean_message(err))
        loc = match.group(1) if match else "<root>"
    return loc


def _clean_message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (not a field of this section)"
    message = err["msg"]
    return message.removeprefix("Value error, ")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> BastionConfig:
    """Load and validate a config file (or the defaults when path is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, source=str(path) if path else "config")


def redact_text(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """Remove known secret values and URL passwords from a string."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redacted_dict(config: BastionConfig) -> dict[str, Any]:
    """The config as plain data with every secret replaced, safe to print, log or store."""
    secrets = config._secret_values

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str):
            if SECRET_FIELD.search(key) and node:
                return REDACTED
            return redact_text(node, secrets)
        return node

    return walk(config.model_dump(mode="json"))


def to_yaml(config: BastionConfig) -> str:
    """Redacted YAML of the whole config (what `bastion config show` prints and checkpoints store)."""
    return yaml.safe_dump(redacted_dict(config), sort_keys=False)
