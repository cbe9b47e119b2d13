"""API keys for `bastion serve`: generation, a hashed key file, and constant-time checks.

A key is `bst_` + 43 URL-safe base64 characters (256 random bits); its id, `key_` + the first
8 hex digits of its SHA-256, is what logs, metrics and rate limits name -- never the key.

The key file holds only SHA-256 digests:

    {"format": "bastion-api-keys", "version": 1,
     "keys": [{"id": "key_1a2b3c4d", "name": "alice", "sha256": "<64 hex>",
               "created": "2025-01-01T00:00:00Z", "revoked": false}]}

It is written atomically with mode 0600, and refused when it is a symlink, not a regular
file, readable or writable by group/others, or over MAX_KEY_FILE_BYTES.

Keys can also come from an environment variable (ServeConfig.api_keys_env, comma-separated
plaintext keys, at least MIN_ENV_KEY_CHARS characters each, of the characters a Bearer token
can carry); those are named "env".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bastion.config.schema import ServeConfig
from bastion.errors import ConfigError
from bastion.safeio import is_sha256, parse_json, replace_file

KEY_PREFIX = "bst_"
KEY_FORMAT = "bastion-api-keys"
KEY_FORMAT_VERSION = 1
MAX_KEY_FILE_BYTES = 4 * 2**20  # ~20k entries; far more than any deployment needs
MAX_KEYS = 10_000
MIN_ENV_KEY_CHARS = 16  # keys from the environment are chosen by people: refuse short ones
MAX_PRESENTED_CHARS = 4096  # a longer Authorization value is never a key: not even hashed

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ID_RE = re.compile(r"key_[0-9a-f]{8}")
# RFC 6750 b64token: what a Bearer header can carry, so also what keys from the environment
# must consist of (bst_ keys, hex, base64 from `openssl rand -base64 32` all fit).
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")


# SHA-256 without salt or work factor is the right hash here: keys are 256-bit random tokens
# (or, from the environment, at least MIN_ENV_KEY_CHARS long), so there is nothing to guess
# offline -- a slow password KDF (scrypt, argon2) would only add latency to every request.
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id(key: str) -> str:
    """The public id of a key: `key_` + the first 8 hex digits of its SHA-256."""
    return "key_" + hash_key(key)[:8]


def _id_of_digest(digest_hex: str) -> str:
    return "key_" + digest_hex[:8]


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 32 bytes -> 43 base64url characters


def bearer_token(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None for anything else
    (another scheme, no token, extra words, characters outside RFC 6750's b64token)."""
    if not header_value or len(header_value) > MAX_PRESENTED_CHARS + 16:
        return None
    parts = header_value.strip(" \t").split(" ", 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1].strip(" ")
    if not token or not token.isascii() or not _TOKEN_RE.fullmatch(token):
        return None
    return token


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid key name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
    if ID_RE.fullmatch(name):
        raise ConfigError(f"invalid key name {name!r}: it looks like a key id (key_xxxxxxxx)")
    return name


# ---- the key file ---------------------------------------------------------------------------


def _read_key_file(path: Path) -> list[dict[str, Any]]:
    """Validated entries of a key file; every problem is a ConfigError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(f"API key file not found: {path} (create it with `bastion serve keys add`)") from None
    except OSError as exc:
        if path.is_symlink():
            raise ConfigError(f"API key file {path} is a symlink; refusing to follow it") from None
        raise ConfigError(f"cannot open API key file {path}: {exc.strerror}") from None
    st = os.fstat(fd)  # checked on the open file: no race with a swapped path
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"API key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if st.st_mode & 0o077:
            raise ConfigError(
                f"API key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be accessible "
                f"by group or others (chmod 600 {path})"
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"API key file {path} is {st.st_size} bytes, over the limit of {MAX_KEY_FILE_BYTES}")
        data = fh.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"API key file {path} grew past the limit of {MAX_KEY_FILE_BYTES} bytes while being read")
    return _validate_doc(parse_json(data, ConfigError, f"API key file {path}"), path)


def _validate_doc(doc: Any, path: Path) -> list[dict[str, Any]]:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"API key file {path} is invalid: {msg}")

    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise bad(f'not a bastion key file (expected "format": "{KEY_FORMAT}")')
    if doc.get("version") != KEY_FORMAT_VERSION:
        raise bad(f"unsupported version {doc.get('version')!r} (this bastion reads version {KEY_FORMAT_VERSION})")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise bad('"keys" must be a list')
    if len(keys) > MAX_KEYS:
        raise bad(f"{len(keys)} keys, over the limit of {MAX_KEYS}")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(keys):
        where = f"keys[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"id", "name", "sha256", "created", "revoked"}:
            raise bad(f"{where} must have exactly the fields id, name, sha256, created, revoked")
        digest, kid, name = entry["sha256"], entry["id"], entry["name"]
        if not is_sha256(digest):
            raise bad(f"{where}.sha256 must be 64 lower-case hex digits")
        if kid != _id_of_digest(digest):
            raise bad(f"{where}.id {kid!r} does not match its sha256")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise bad(f"{where}.name is not a valid key name")
        if not isinstance(entry["created"], str) or len(entry["created"]) > 64:
            raise bad(f"{where}.created must be a timestamp string")
        if not isinstance(entry["revoked"], bool):
            raise bad(f"{where}.revoked must be true or false")
        if digest in seen:
            raise bad(f"{where} repeats the key {kid}")
        seen.add(digest)
        out.append(dict(entry))
    return out


def _write_key_file(path: Path, entries: list[dict[str, Any]]) -> None:
    doc = {"format": KEY_FORMAT, "version": KEY_FORMAT_VERSION, "keys": entries}
    replace_file(path, (json.dumps(doc, indent=2) + "\n").encode())  # atomic, 0600, no symlink


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise read-modify-write of a key file between processes (`keys add` run twice at
    once must not lose a key): an exclusive flock on the folder that holds it."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_key(path: str | os.PathLike[str], name: str) -> tuple[str, str]:
    """Create a key named `name` in the key file (created if missing); returns (key id,
    plaintext key). The plaintext is not stored anywhere: show it once."""
    path = Path(path)
    validate_name(name)
    if not path.parent.is_dir():
        raise ConfigError(f"folder of the API key file does not exist: {path.parent}")
    with _locked(path.parent):
        return _add_key_locked(path, name)


def _add_key_locked(path: Path, name: str) -> tuple[str, str]:
    entries = _read_key_file(path) if (path.exists() or path.is_symlink()) else []
    if any(e["name"] == name and not e["revoked"] for e in entries):
        raise ConfigError(f"API key file {path} already has an active key named {name!r}")
    if len(entries) >= MAX_KEYS:
        raise ConfigError(f"API key file {path} already holds {MAX_KEYS} keys (the limit)")
    ids = {e["id"] for e in entries}
    while True:  # a 32-bit id collision is improbable; draw again rather than share an id
        key = generate_key()
        digest = hash_key(key)
        if _id_of_digest(digest) not in ids:
            break
    kid = _id_of_digest(digest)
    entries.append({"id": kid, "name": name, "sha256": digest, "created": _now_iso(), "revoked": False})
    _write_key_file(path, entries)
    return kid, key


def list_keys(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every key of the file as {"id", "name", "created", "revoked"} (digests are left out)."""
    return [{k: e[k] for k in ("id", "name", "created", "revoked")} for e in _read_key_file(Path(path))]


def revoke_key(path: str | os.PathLike[str], key_id_or_name: str) -> str:
    """Mark a key revoked, by id (`key_xxxxxxxx`) or by the name of an active key; returns its
    id. Revoking an already revoked key (by id) changes nothing."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"API key file not found: {path}")
    with _locked(path.parent):
        return _revoke_key_locked(path, key_id_or_name)


def _revoke_key_locked(path: Path, key_id_or_name: str) -> str:
    entries = _read_key_file(path)
    if ID_RE.fullmatch(key_id_or_name):
        matches = [e for e in entries if e["id"] == key_id_or_name]
    else:
        matches = [e for e in entries if e["name"] == key_id_or_name and not e["revoked"]]
        if not matches and any(e["name"] == key_id_or_name for e in entries):
            raise ConfigError(f"every key named {key_id_or_name!r} in {path} is already revoked")
    if not matches:
        raise ConfigError(f"no key with id or name {key_id_or_name!r} in {path} (see `bastion serve keys list`)")
    entry = matches[0]
    if not entry["revoked"]:
        entry["revoked"] = True
        _write_key_file(path, entries)
    return entry["id"]


# ---- the store the server checks requests against -----------------------------------------


@dataclass(frozen=True)
class _Key:
    id: str
    name: str
    digest: bytes  # raw SHA-256


def _env_keys(environ: Mapping[str, str], var: str) -> list[_Key]:
    raw = environ.get(var, "")
    out = []
    for i, key in enumerate(k.strip() for k in raw.split(",")):
        if not key:
            continue
        # Never quote the value: the message may end up in a log.
        if not _TOKEN_RE.fullmatch(key):
            raise ConfigError(f"${var}: key #{i + 1} has characters a Bearer token cannot carry "
                              "(use A-Z a-z 0-9 - . _ ~ + / and trailing =)")
        if len(key) < MIN_ENV_KEY_CHARS:
            raise ConfigError(f"${var}: key #{i + 1} is shorter than {MIN_ENV_KEY_CHARS} characters; "
                              "generate one with `bastion serve keys add` or `openssl rand -hex 32`")
        digest = hashlib.sha256(key.encode()).digest()
        out.append(_Key(_id_of_digest(digest.hex()), "env", digest))
    return out


class KeyStore:
    """The API keys a server accepts: from the environment and/or the key file.

    `authenticate` hashes the presented key and compares the digest with every accepted
    digest using `hmac.compare_digest`, without stopping at a match, so the time taken does not
    depend on which key (if any) matched. Revoked keys are not loaded at all.

    The key file is re-read when it changes (checked at most every `reload_interval_s`), so a
    revocation takes effect without a restart. If the changed file cannot be read (corrupt,
    wrong mode), its keys stop working -- fail closed -- and the problem is reported on stderr.
    """

    def __init__(self, env_keys: list[_Key] | None = None, key_file: Path | None = None,
                 metrics_digest: bytes | None = None, reload_interval_s: float = 5.0,
                 clock=time.monotonic) -> None:
        self._env = tuple(env_keys or ())
        self._key_file = key_file
        self._metrics_digest = metrics_digest
        self._reload_interval = reload_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._file_keys: tuple[_Key, ...] = ()
        self._file_sig: tuple[int, ...] | None = None
        self._next_check = 0.0
        if key_file is not None:
            self._load_file()  # at start-up a bad file is an error, not a warning
        self._active: tuple[_Key, ...] = self._env + self._file_keys

    @classmethod
    def from_config(cls, cfg: ServeConfig, environ: Mapping[str, str] = os.environ, *,
                    reload_interval_s: float = 5.0) -> KeyStore:
        env_keys = _env_keys(environ, cfg.api_keys_env)
        metrics_digest = None
        if cfg.metrics_key_env is not None:
            value = environ.get(cfg.metrics_key_env, "").strip()
            if not value:
                raise ConfigError(f"serve.metrics_key_env is {cfg.metrics_key_env}, but ${cfg.metrics_key_env} is not set")
            if len(value) < MIN_ENV_KEY_CHARS or not _TOKEN_RE.fullmatch(value):
                raise ConfigError(f"${cfg.metrics_key_env}: the metrics key must be at least {MIN_ENV_KEY_CHARS} "
                                  "characters from A-Z a-z 0-9 - . _ ~ + / (and trailing =)")
            metrics_digest = hashlib.sha256(value.encode()).digest()
        key_file = Path(cfg.key_file).expanduser() if cfg.key_file is not None else None
        return cls(env_keys, key_file, metrics_digest, reload_interval_s)

    # -- queries --

    @property
    def has_keys(self) -> bool:
        """Whether API keys are configured: keys in the environment, or a key file (even one
        whose keys are all revoked -- requests are then refused, never let through)."""
        return bool(self._env) or self._key_file is not None

    @property
    def has_metrics_key(self) -> bool:
        return self._metrics_digest is not None

    def authenticate(self, presented: str | None) -> str | None:
        """The id of the (unrevoked) key presented, or None."""
        self._maybe_reload()
        active = self._active  # one consistent snapshot (replaced, never mutated)
        if not presented or len(presented) > MAX_PRESENTED_CHARS:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for key in active:  # every key is compared; no early exit
            if hmac.compare_digest(digest, key.digest):
                found = key.id
        return found

    def authenticate_metrics(self, presented: str | None) -> bool:
        """Whether `presented` is the metrics key; always False when none is configured."""
        if self._metrics_digest is None or not presented or len(presented) > MAX_PRESENTED_CHARS:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._metrics_digest)

    def key_name(self, kid: str) -> str | None:
        """The name of an accepted key id (for logs and metrics labels), or None."""
        return next((k.name for k in self._active if k.id == kid), None)

    # -- reloading --

    def reload(self) -> None:
        """Re-read the key file now (a ConfigError if it is unusable; keys unchanged then)."""
        if self._key_file is None:
            return
        with self._lock:
            self._load_file()
            self._active = self._env + self._file_keys

    def _signature(self) -> tuple[int, ...] | None:
        assert self._key_file is not None
        try:
            st = os.lstat(self._key_file)
        except OSError:
            return None
        # ctime and mode too: a chmod must be noticed (a file made readable is refused)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    def _load_file(self) -> None:
        assert self._key_file is not None
        sig = self._signature()
        entries = _read_key_file(self._key_file)
        self._file_keys = tuple(_Key(e["id"], e["name"], bytes.fromhex(e["sha256"]))
                                for e in entries if not e["revoked"])
        self._file_sig = sig

    def _maybe_reload(self) -> None:
        if self._key_file is None or self._reload_interval <= 0:
            return
        now = self._clock()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self._reload_interval
            sig = self._signature()
            if sig == self._file_sig:
                return
            try:
                self._load_file()
            except ConfigError as exc:
                self._file_keys = ()
                self._file_sig = sig
                print(f"bastion serve: API key file unusable, its keys are refused until it is fixed: {exc}",
                      file=sys.stderr, flush=True)
            self._active = self._env + self._file_keys
