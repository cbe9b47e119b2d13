"""Load a config: YAML file -> --set overrides -> ${ENV} interpolation -> typed command-line
values -> presets -> validation.

Values from the environment: every `${VAR}` substitution is remembered with its path and
variable (`EnvValue`). Error messages never show such a value, whatever the variable is
called: they name the variable instead ("the value of ${VAR}"), all in `_invalid`. Values of
variables whose names look secret (`is_secret_name`: KEY, TOKEN, SECRET, PASSWORD, ...) and
passwords inside URLs are also redacted wherever the config is printed or stored
(`redacted_dict`). Text from the command line or the environment stays text: the field's
type converts it ("8", "3e-4", "true"), so `0` or `::` reach serve.host as the strings they are.
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.config.presets import PRESETS
from bastion.config.schema import BastionConfig
from bastion.errors import ConfigError

MAX_CONFIG_BYTES = 1 * 2**20
REDACTED = "***REDACTED***"
SECRET_FIELD = re.compile(r"(token|secret|password|passwd|credential|api_?key|access_?key|private_?key)$", re.I)
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)
# A secret this short is redacted where it was put, not searched for in all other text: "1"
# would otherwise turn every 1 of a config into ***REDACTED***.
MIN_SEARCHED_SECRET_CHARS = 4
_NUMBER = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9]*)?([eE][-+]?[0-9]+)?")

# A variable's name looks secret when one of its words (split at non-letters and camelCase)
# ends in KEY, KEYS or TOKEN (OPENAI_KEY, APIKEY, HF_TOKEN; not KEYBOARD, TOKENIZER or
# MAX_TOKENS), contains SECRET, PASSWORD, PASSWD, PASSPHRASE, CREDENTIAL or PRIVATE, or is PASS,
# PWD, CREDS, AUTH, AUTHORIZATION, BEARER, COOKIE or DSN. The rule errs towards redacting
# (MONKEY counts: a word ending in KEY is more often APIKEY or SSHKEY than an animal): a
# harmless value shown as ***REDACTED*** costs little, a secret shown costs the secret.
# $PWD and $OLDPWD are the shell's working directories, not passwords.
_SECRET_WORD = re.compile(r"[A-Z]*(KEYS?|TOKEN)|[A-Z]*(SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE)[A-Z]*"
                          r"|PASS|PWD|CREDS|AUTH|AUTHORIZATION|BEARER|COOKIE|DSN")
_NAME_WORDS = re.compile(r"[^A-Za-z]+|(?<=[a-z])(?=[A-Z])")
_NOT_SECRET_NAMES = {"PWD", "OLDPWD"}


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (see _SECRET_WORD)."""
    if name.upper() in _NOT_SECRET_NAMES:
        return False
    return any(_SECRET_WORD.fullmatch(word.upper()) for word in _NAME_WORDS.split(name) if word)


@dataclass(frozen=True)
class EnvValue:
    """A config value that came, wholly or in part, from environment variables."""

    path: tuple[str | int, ...]  # where it sits: ("data", "sources", 0)
    variables: tuple[tuple[str, str], ...]  # (variable, the text it put in), in order

    @property
    def secret(self) -> bool:
        return any(is_secret_name(name) for name, _ in self.variables)


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


def interpolate(node: Any, found: list[EnvValue], env: Mapping[str, str] | None = None,
                path: tuple[str | int, ...] = ()) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string (`$${` escapes a literal `${`);
    each value that took text from the environment is appended to `found`. The result stays
    text: the field's type converts it, as it does a value written in the file."""
    env = os.environ if env is None else env
    if isinstance(node, dict):
        return {k: interpolate(v, found, env, (*path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, found, env, (*path, i)) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    used: list[tuple[str, str]] = []

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                where = dotted_path(path) or "<root>"
                raise ConfigError(
                    f"{where}: environment variable {name} is not set (use ${{{name}:-default}} for a default)",
                    [(where, f"environment variable {name} is not set")],
                )
            return default  # text from the file, not from the environment
        used.append((name, value))
        return value

    result = _ENV_REF.sub(substitute, node)
    if used:
        found.append(EnvValue(path, tuple(used)))
        _SECRETS_SEEN.update(_searched_secrets([found[-1]]))
    return result


# Every secret-named value this process has read from the environment -> its label: the CLI
# redacts them from any message it prints, also one raised long after validation (a path
# or a URL built from a secret, quoted by whatever refused it).
_SECRETS_SEEN: dict[str, str] = {}


def redact_seen_secrets(text: str) -> str:
    """`text` with every secret-named environment value this process has read redacted."""
    return redact_text(text, _SECRETS_SEEN)


def dotted_path(path: tuple[str | int, ...]) -> str:
    """("data", "sources", 0) -> "data.sources[0]"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override. The value is text that the field's type
    converts (`8`, `3e-4`, `true`, `::`, `0`); only YAML flow lists and mappings (`[a, b]`,
    `{k: v}`), quoted strings and null (`null`, `~`) are read as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    text = raw.strip()
    if text[:1] in ("[", "{", "'", '"') or text in ("null", "Null", "NULL", "~"):
        value = parse_yaml(text, f"override {dotted.strip()}")
    else:
        value = text
    _set_value(data, dotted.strip(), value, f"override {override!r}")


def _set_value(data: dict[str, Any], dotted: str, value: Any, what: str) -> None:
    keys = dotted.split(".")
    if any(not k for k in keys):
        raise ConfigError(f"{what} has an empty key")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _expand_model_preset(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str, bool]]:
    """Replace model.preset by its fields; the problem (location, message, quotes input) if unknown."""
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        name = model.pop("preset")
        if not isinstance(name, str) or name not in PRESETS:
            shown = repr(name) if isinstance(name, str) else "a non-string value"
            return [(("model", "preset"), f"{shown} is not a known preset; choose one of "
                                          f"{', '.join(sorted(PRESETS))}", True)]
        data["model"] = {**PRESETS[name], **model}
    return []


def build_config(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config", *,
                 interpolate_env: bool = True, values: Mapping[str, Any] | None = None) -> BastionConfig:
    """Validate a raw mapping (already read from YAML) into a BastionConfig. `values` are
    typed settings from command-line options ({"serve.host": "::"}), set last and taken as
    they are (never read as YAML or interpolated). A config stored in a checkpoint is built
    with interpolate_env=False: its `${VAR}` text stays text, so a checkpoint from elsewhere
    can never pull a value out of this machine's environment."""
    data = copy.deepcopy(dict(data))  # overrides write into nested sections: never the caller's
    for override in overrides:
        apply_override(data, override)
    from_env: list[EnvValue] = []
    if interpolate_env:
        data = interpolate(data, from_env)
    for dotted, value in (values or {}).items():
        _set_value(data, dotted, value, dotted)
        replaced = tuple(dotted.split("."))
        from_env = [v for v in from_env if v.path[:len(replaced)] != replaced]
    problems = _expand_model_preset(data)
    if not problems:
        try:
            config = BastionConfig.model_validate(data)
        except ValidationError as exc:
            problems = [_problem(err) for err in exc.errors()]
    if problems:
        raise _invalid(source, problems, from_env)
    config._from_env = from_env
    return config


def _problem(err: dict[str, Any]) -> tuple[tuple[str | int, ...], str, bool]:
    """(location, message, whether the message may quote input) of a pydantic error.
    Pydantic's own messages never hold the input (Section sets hide_input_in_errors); the
    messages of our validators (value_error) may."""
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key (not a field of this section)"
    return tuple(err["loc"]), message, err["type"] == "value_error"


_LEADING_FIELD = re.compile(r"^([a-z_]+\.[a-z_]+) ")


def _invalid(source: str, problems: list[tuple[tuple[str | int, ...], str, bool]],
             from_env: list[EnvValue]) -> ConfigError:
    """The one ConfigError for every validation problem: values from the environment are
    named by their variable, never shown, and secrets are redacted on top."""
    secrets = _searched_secrets(from_env)
    shown: list[tuple[str, str]] = []
    for loc, message, quotes_input in problems:
        if quotes_input:
            message = hide_env_values(message, from_env, under=loc)
        field = dotted_path(loc)
        if not field:  # a cross-section check; its message starts with the field it is about
            match = _LEADING_FIELD.match(message)
            field = match.group(1) if match else "<root>"
        shown.append((field, redact_text(message, secrets)))
    lines = "\n".join(f"  {field}: {message}" for field, message in shown)
    return ConfigError(f"{source} is invalid ({len(shown)} problem(s)):\n{lines}", shown)


def hide_env_values(text: str, from_env: Iterable[EnvValue], under: tuple[str | int, ...] = ()) -> str:
    """`text` with each value that came from the environment into the config at or below
    `under` replaced by "the value of ${VAR}": quoted or not, in any letter case, and as the
    number it became ("007" -> 7)."""
    names: dict[str, str] = {}
    for value in from_env:
        if value.path[:len(under)] == under:
            for name, put in value.variables:
                for form in _forms(put):
                    names.setdefault(form.casefold(), name)
    if not names:
        return text
    alternatives = "|".join(_as_found(form) for form in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(['\"]?)({alternatives})\1", re.I)
    return pattern.sub(lambda m: f"the value of ${{{names.get(m.group(2).casefold(), '?')}}}", text)


def _as_found(form: str) -> str:
    """A pattern for one value in a message: a number or a short word only where it stands
    alone (the 2 inside 1024 is not it), longer text anywhere (it may sit inside a word)."""
    if _NUMBER.fullmatch(form):
        return rf"(?<![0-9]){re.escape(form)}(?![0-9])"
    if len(form) < MIN_SEARCHED_SECRET_CHARS:
        return rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])"
    return re.escape(form)


def _forms(text: str) -> set[str]:
    """The ways a value may be printed once a field has converted it."""
    forms = {text.strip()} - {""}
    for convert in (int, float):
        try:
            forms.add(str(convert(text)))
        except (ValueError, OverflowError):
            pass
    return forms


def hide_env(config: BastionConfig, text: str, under: str = "") -> str:
    """`text`, a message about the config's values under the section or field `under`
    ("serve"), with each of them that came from the environment named by its variable
    instead of shown; secrets redacted."""
    section = tuple(under.split(".")) if under else ()
    return redact_text(hide_env_values(text, config._from_env, section), _searched_secrets(config._from_env))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: Mapping[str, Any] | None = None) -> BastionConfig:
    """Load and validate a config file (or the defaults when path is None), then the --set
    overrides, then typed command-line `values` ({"serve.port": 9000})."""
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, source=str(path) if path else "config", values=values)


def _label(name: str) -> str:
    return f"{REDACTED}(${{{name}}})"


def _searched_secrets(from_env: Iterable[EnvValue]) -> dict[str, str]:
    """Secret text -> its label, for every secret long enough to search for in any text."""
    return {put: _label(name) for value in from_env for name, put in value.variables
            if is_secret_name(name) and len(put) >= MIN_SEARCHED_SECRET_CHARS}


def redact_text(text: str, secrets: Iterable[str] | Mapping[str, str] = ()) -> str:
    """Remove known secret values (replaced by their label when `secrets` maps them to one)
    and URL passwords from a string."""
    labels = secrets if isinstance(secrets, Mapping) else dict.fromkeys(secrets, REDACTED)
    labels = {secret: label for secret, label in labels.items() if secret}
    if labels:
        pattern = re.compile("|".join(re.escape(s) for s in sorted(labels, key=len, reverse=True)))
        text = pattern.sub(lambda m: labels[m.group(0)], text)  # one pass: a label is never searched
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redacted_dict(config: BastionConfig) -> dict[str, Any]:
    """The config as plain data, safe to print, log or store: values of secret-looking
    variables and fields are redacted (the variable named), where they were put and anywhere
    else they appear; URL passwords too. Numbers and booleans are shown: a credential is text."""
    searched = _searched_secrets(config._from_env)
    put_at = {v.path: v for v in config._from_env if v.secret}

    def walk(node: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        if not isinstance(node, str) or not node:
            return node
        key = next((p for p in reversed(path) if isinstance(p, str)), "")
        if SECRET_FIELD.search(key):
            return REDACTED
        origin = put_at.get(path)
        if origin is None:
            return redact_text(node, searched)
        own = {put: _label(name) for name, put in origin.variables if is_secret_name(name)}
        shown = redact_text(node, {**searched, **own})
        # A value the field changed (say, lower-cased) no longer holds the secret's text: hide it all.
        return shown if shown != node else _label(next(name for name, _ in origin.variables if is_secret_name(name)))

    return walk(config.model_dump(mode="json"), ())


def to_yaml(config: BastionConfig) -> str:
    """Redacted YAML of the whole config (what `bastion config show` prints and checkpoints store)."""
    return yaml.safe_dump(redacted_dict(config), sort_keys=False)
