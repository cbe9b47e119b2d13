"""API keys: key file safety, constant-time checks, env keys, bearer parsing, the keys CLI."""
import hashlib
import hmac
import json
import os
import re

import pytest
import typer
from typer.testing import CliRunner

from bastion.cli import _BastionGroup
from bastion.config.schema import ServeConfig
from bastion.errors import ConfigError
from bastion.serve import keys as keys_mod
from bastion.serve.keys import (
    KeyStore,
    add_key,
    bearer_token,
    generate_key,
    key_id,
    list_keys,
    revoke_key,
)
from bastion.serve.keys_cli import keys_app

ENV_KEY = "env-key-0123456789abcdef"


def cfg_for(path=None, **kw):
    return ServeConfig(key_file=str(path) if path is not None else None, **kw)


# ---- key format ---------------------------------------------------------------------------------


def test_key_format_and_id():
    key = generate_key()
    assert re.fullmatch(r"bst_[A-Za-z0-9_-]{43}", key)
    assert key_id(key) == "key_" + hashlib.sha256(key.encode()).hexdigest()[:8]
    assert generate_key() != key


# ---- key file -----------------------------------------------------------------------------------


def test_add_list_revoke_roundtrip(tmp_path):
    path = tmp_path / "keys.json"
    kid, key = add_key(path, "alice")
    assert kid == key_id(key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    raw = path.read_text()
    assert key not in raw  # only the digest is stored
    doc = json.loads(raw)
    assert doc["format"] == "bastion-api-keys" and doc["version"] == 1
    assert doc["keys"][0]["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    kid2, key2 = add_key(path, "bob")
    listed = list_keys(path)
    assert [k["name"] for k in listed] == ["alice", "bob"]
    assert all(set(k) == {"id", "name", "created", "revoked"} for k in listed)  # no digests

    store = KeyStore.from_config(cfg_for(path), environ={})
    assert store.has_keys
    assert store.authenticate(key) == kid and store.authenticate(key2) == kid2
    assert store.key_name(kid) == "alice"
    assert store.authenticate(key + "x") is None
    assert store.authenticate("") is None and store.authenticate(None) is None

    assert revoke_key(path, "alice") == kid
    assert revoke_key(path, kid) == kid  # by id, again: no change, no error
    assert [k["revoked"] for k in list_keys(path)] == [True, False]
    store = KeyStore.from_config(cfg_for(path), environ={})
    assert store.authenticate(key) is None  # revoked keys never match
    assert store.authenticate(key2) == kid2
    # the name is free again once its key is revoked
    kid3, _ = add_key(path, "alice")
    assert kid3 != kid
    with pytest.raises(ConfigError, match="already has an active key named 'alice'"):
        add_key(path, "alice")


def test_revoke_errors(tmp_path):
    path = tmp_path / "keys.json"
    kid, _ = add_key(path, "alice")
    with pytest.raises(ConfigError, match="no key with id or name 'carol'"):
        revoke_key(path, "carol")
    with pytest.raises(ConfigError, match="no key with id or name 'key_00000000'"):
        revoke_key(path, "key_00000000")
    revoke_key(path, kid)
    with pytest.raises(ConfigError, match="already revoked"):
        revoke_key(path, "alice")


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "slash/x", "key_0123abcd", "naïve", "a\n"])
def test_bad_names(tmp_path, name):
    with pytest.raises(ConfigError, match="invalid key name"):
        add_key(tmp_path / "keys.json", name)
    assert not (tmp_path / "keys.json").exists()


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="API key file not found: .*nope.json"):
        list_keys(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="not found"):
        revoke_key(tmp_path / "nope.json", "x")
    with pytest.raises(ConfigError, match="not found"):
        KeyStore.from_config(cfg_for(tmp_path / "nope.json"), environ={})
    with pytest.raises(ConfigError, match="folder of the API key file does not exist"):
        add_key(tmp_path / "missing" / "keys.json", "alice")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_loose_permissions_refused(tmp_path, mode):
    path = tmp_path / "keys.json"
    add_key(path, "alice")
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*chmod 600"):
        KeyStore.from_config(cfg_for(path), environ={})
    with pytest.raises(ConfigError, match="group or others"):
        list_keys(path)
    with pytest.raises(ConfigError, match="group or others"):
        add_key(path, "bob")


def test_symlink_refused(tmp_path):
    real = tmp_path / "real.json"
    add_key(real, "alice")
    link = tmp_path / "keys.json"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        KeyStore.from_config(cfg_for(link), environ={})
    with pytest.raises(ConfigError, match="symlink"):
        add_key(link, "bob")
    assert len(list_keys(real)) == 1


def test_not_a_regular_file(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(ConfigError):
        list_keys(tmp_path / "d")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        ("[]", "not a bastion key file"),
        ('{"format": "bastion-api-keys", "version": 2, "keys": []}', "unsupported version 2"),
        ('{"format": "bastion-api-keys", "version": 1, "keys": {}}', '"keys" must be a list'),
        ('{"format": "bastion-api-keys", "version": 1, "keys": [{"id": "key_00000000"}]}', "exactly the fields"),
        ('{"format": "bastion-api-keys", "version": 1, "keys": [{"id": "key_00000000", "name": "a", '
         '"sha256": "' + "1" * 64 + '", "created": "x", "revoked": false}]}', "does not match its sha256"),
        ('{"format": "bastion-api-keys", "version": 1, "keys": [{"id": "key_11111111", "name": "a", '
         '"sha256": "' + "1" * 64 + '", "created": "x", "revoked": "no"}]}', "revoked must be true or false"),
        ('{"format": "bastion-api-keys", "version": 1, "keys": [{"id": "key_11111111", "name": "a", '
         '"sha256": "' + "1" * 63 + 'G", "created": "x", "revoked": false}]}', "64 lower-case hex"),
    ],
)
def test_corrupt_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        KeyStore.from_config(cfg_for(path), environ={})
    assert str(path) in str(info.value) and message in str(info.value)


def test_oversized_file_refused(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    add_key(path, "alice")
    monkeypatch.setattr(keys_mod, "MAX_KEY_FILE_BYTES", 50)
    with pytest.raises(ConfigError, match="over the limit of 50"):
        list_keys(path)


# ---- env keys, metrics key ---------------------------------------------------------------------


def test_env_keys():
    other = "c2Vjb25kLWtleS1BQkNERUZHSElKS0w+/Q=="  # base64 (openssl rand -base64) works
    store = KeyStore.from_config(ServeConfig(), environ={"BASTION_API_KEYS": f" {ENV_KEY} ,, {other},"})
    assert store.has_keys
    assert store.authenticate(ENV_KEY) == key_id(ENV_KEY)
    assert store.authenticate(other) == key_id(other)
    assert store.authenticate(bearer_token(f"Bearer {other}")) == key_id(other)
    assert store.key_name(key_id(other)) == "env"
    assert store.authenticate(ENV_KEY[:-1]) is None
    custom = KeyStore.from_config(ServeConfig(api_keys_env="MY_KEYS"), environ={"MY_KEYS": ENV_KEY,
                                                                                 "BASTION_API_KEYS": other})
    assert custom.authenticate(ENV_KEY) and custom.authenticate(other) is None


def test_no_keys_configured():
    store = KeyStore.from_config(ServeConfig(), environ={})
    assert not store.has_keys and not store.has_metrics_key
    assert store.authenticate("anything-at-all-long-enough") is None
    assert store.authenticate_metrics("anything") is False


def test_env_and_file_keys_together(tmp_path):
    path = tmp_path / "keys.json"
    kid, key = add_key(path, "alice")
    store = KeyStore.from_config(cfg_for(path), environ={"BASTION_API_KEYS": ENV_KEY})
    assert store.authenticate(key) == kid and store.authenticate(ENV_KEY) == key_id(ENV_KEY)


@pytest.mark.parametrize("value, message", [("tiny1", "shorter than 16"), ("has space in the key", "cannot carry"),
                                            ("ünïcödé-key-0123456789", "cannot carry"),
                                            ("bang!bang!bang!bang!", "cannot carry")])
def test_weak_env_keys_refused_without_echoing_them(value, message):
    with pytest.raises(ConfigError, match=message) as info:
        KeyStore.from_config(ServeConfig(), environ={"BASTION_API_KEYS": f"{ENV_KEY},{value}"})
    assert value not in str(info.value) and "key #2" in str(info.value)


def test_metrics_key():
    metrics = "metrics-key-0123456789abcdef"
    cfg = ServeConfig(metrics_key_env="BASTION_METRICS_KEY")
    store = KeyStore.from_config(cfg, environ={"BASTION_METRICS_KEY": metrics, "BASTION_API_KEYS": ENV_KEY})
    assert store.has_metrics_key
    assert store.authenticate_metrics(metrics) is True
    assert store.authenticate_metrics(ENV_KEY) is False  # an API key is not the metrics key
    assert store.authenticate(metrics) is None  # ... nor the other way round
    assert store.authenticate_metrics(None) is False and store.authenticate_metrics("") is False
    with pytest.raises(ConfigError, match="BASTION_METRICS_KEY is not set"):
        KeyStore.from_config(cfg, environ={})
    with pytest.raises(ConfigError, match="at least 16"):
        KeyStore.from_config(cfg, environ={"BASTION_METRICS_KEY": "short"})


# ---- constant time -------------------------------------------------------------------------------


def test_every_key_compared_with_compare_digest(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    made = [add_key(path, f"k{i}") for i in range(5)]
    revoke_key(path, "k4")
    store = KeyStore.from_config(cfg_for(path), environ={"BASTION_API_KEYS": ENV_KEY})
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_mod.hmac, "compare_digest", counting)
    active = 5  # 4 file keys + 1 env key; the revoked one is not loaded
    for presented, expected in [(made[0][1], made[0][0]), (made[3][1], made[3][0]), (ENV_KEY, key_id(ENV_KEY)),
                                ("bst_" + "x" * 43, None), (made[4][1], None)]:
        calls.clear()
        assert store.authenticate(presented) == expected
        assert len(calls) == active  # no early exit: same work whichever key matched
        assert all(len(a) == 32 and len(b) == 32 for a, b in calls)  # digests, never the plaintext
    calls.clear()
    assert store.authenticate("x" * 5000) is None  # longer than any key: not even hashed


def test_reload_picks_up_revocation(tmp_path):
    path = tmp_path / "keys.json"
    kid, key = add_key(path, "alice")
    now = [0.0]
    store = KeyStore(key_file=path, reload_interval_s=5.0, clock=lambda: now[0])
    assert store.authenticate(key) == kid
    revoke_key(path, kid)
    now[0] = 1.0
    store.authenticate(key)  # first check after start: sees the change
    now[0] = 10.0
    assert store.authenticate(key) is None
    kid2, key2 = add_key(path, "bob")
    now[0] = 20.0
    assert store.authenticate(key2) == kid2


def test_reload_of_broken_file_fails_closed(tmp_path, capsys):
    path = tmp_path / "keys.json"
    kid, key = add_key(path, "alice")
    now = [0.0]
    store = KeyStore(key_file=path, reload_interval_s=1.0, clock=lambda: now[0])
    now[0] = 2.0
    assert store.authenticate(key) == kid
    os.chmod(path, 0o644)
    now[0] = 4.0
    assert store.authenticate(key) is None
    assert store.has_keys  # still "keys configured": requests are refused, not let through
    assert "API key file unusable" in capsys.readouterr().err
    os.chmod(path, 0o600)
    now[0] = 6.0
    assert store.authenticate(key) == kid


# ---- bearer parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, token",
    [
        ("Bearer bst_abc-DEF_123", "bst_abc-DEF_123"),
        ("bearer tok", "tok"),
        ("BEARER tok", "tok"),
        ("  Bearer   tok  ", "tok"),
        ("Bearer a.b~c+d/e==", "a.b~c+d/e=="),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Token tok", None),
        ("Bearertok", None),
        ("Bearer tok extra", None),
        ("Bearer tok\x00", None),
        ("Bearer tök", None),
        ("Bearer =abc", None),
        ("Bearer a=b", None),
        ("Bearer\ttok", None),
        ("Bearer " + "a" * 5000, None),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


# ---- CLI -----------------------------------------------------------------------------------------


def _cli():
    app = typer.Typer(cls=_BastionGroup)
    app.add_typer(keys_app, name="keys")
    return app


def test_cli_add_list_revoke(tmp_path):
    runner = CliRunner()
    app = _cli()
    path = tmp_path / "keys.json"
    res = runner.invoke(app, ["keys", "add", "--key-file", str(path), "--name", "alice"])
    assert res.exit_code == 0, res.output
    key = re.search(r"bst_[A-Za-z0-9_-]{43}", res.output).group()
    assert "only time the key is shown" in res.output
    assert key not in path.read_text()
    listed = runner.invoke(app, ["keys", "list", "--key-file", str(path)])
    assert listed.exit_code == 0 and "alice" in listed.output and "active" in listed.output
    assert key not in listed.output and hashlib.sha256(key.encode()).hexdigest() not in listed.output
    as_json = runner.invoke(app, ["keys", "list", "--key-file", str(path), "--json"])
    assert json.loads(as_json.output)[0]["id"] == key_id(key)
    rev = runner.invoke(app, ["keys", "revoke", "--key-file", str(path), "alice"])
    assert rev.exit_code == 0 and key_id(key) in rev.output
    assert "revoked" in runner.invoke(app, ["keys", "list", "--key-file", str(path)]).output
    bad = runner.invoke(app, ["keys", "revoke", "--key-file", str(path), "nobody"])
    assert bad.exit_code == 2 and "nobody" in bad.output
    os.chmod(path, 0o644)
    loose = runner.invoke(app, ["keys", "list", "--key-file", str(path)])
    assert loose.exit_code == 2 and "chmod 600" in loose.output


def test_cli_help_texts():
    runner = CliRunner()
    for cmd in ("add", "list", "revoke"):
        res = runner.invoke(_cli(), ["keys", cmd, "--help"])
        assert res.exit_code == 0 and "--key-file" in res.output and "Key file" in res.output


def test_has_keys_with_only_revoked_keys(tmp_path):
    """A key file whose keys are all revoked still means "keys required": nothing gets in."""
    path = tmp_path / "keys.json"
    kid, key = add_key(path, "alice")
    revoke_key(path, kid)
    store = KeyStore.from_config(cfg_for(path), environ={})
    assert store.has_keys and store.authenticate(key) is None
