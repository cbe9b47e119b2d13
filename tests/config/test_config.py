import json
from pathlib import Path

import pytest

from bastion.config import build_config, load_config, to_yaml
from bastion.config.load import REDACTED
from bastion.errors import ConfigError


def problems_of(data, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(data, overrides)
    return dict(info.value.problems), str(info.value)


def test_defaults_are_valid():
    cfg = build_config({})
    assert cfg.train.batch_size == 8 and cfg.model.head_dim == 64


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "batch_size", 0),
        ("train", "batch_size", 1025),
        ("train", "epochs", 101),
        ("train", "epochs", 0),
        ("train", "lr", 0),
        ("train", "lr", -1e-3),
        ("train", "lr", float("nan")),
        ("train", "lr", float("inf")),
        ("train", "lr", 11),
        ("train", "seq_len", 4),
        ("train", "grad_accum", 0),
        ("train", "grad_clip", 0),
        ("train", "beta2", 1.0),
        ("model", "vocab_size", 8),
        ("model", "n_layer", 0),
        ("model", "dropout", 1.0),
        ("model", "max_seq_len", 2),
        ("data", "val_fraction", 0.9),
        ("data", "max_file_bytes", 0),
        ("data", "shard_tokens", 10),
        ("generate", "max_new_tokens_ceiling", 0),
        ("generate", "top_p", 0),
        ("generate", "temperature", -1),
        ("checkpoint", "every_steps", 0),
    ],
)
def test_every_bound_is_enforced(section, key, value):
    problems, _ = problems_of({section: {key: value}})
    assert f"{section}.{key}" in problems


def test_lr_message_is_clear():
    problems, _ = problems_of({"train": {"lr": float("nan")}})
    assert "finite" in problems["train.lr"]


def test_unknown_keys_are_errors_at_every_level():
    problems, _ = problems_of({"train": {"learning_rate": 1e-3}, "modle": {}})
    assert problems["train.learning_rate"].startswith("unknown key")
    assert "modle" in problems


def test_all_problems_reported_together():
    problems, message = problems_of({"train": {"batch_size": 0, "lr": -1}, "model": {"n_layer": 0}})
    assert {"train.batch_size", "train.lr", "model.n_layer"} <= set(problems)
    assert "3 problem(s)" in message


def test_model_dims_must_divide():
    problems, message = problems_of({"model": {"d_model": 100, "n_head": 3}})
    assert "divisible by n_head" in message
    _, message = problems_of({"model": {"d_model": 96, "n_head": 4, "n_kv_head": 3}})
    assert "n_kv_head" in message
    _, message = problems_of({"model": {"d_model": 36, "n_head": 4}})
    assert "even" in message


def test_seq_len_must_fit_model():
    problems, message = problems_of({"model": {"max_seq_len": 64}, "train": {"seq_len": 128}})
    assert "train.seq_len" in problems
    assert "train.seq_len (128) exceeds model.max_seq_len (64)" in message


def test_generation_default_over_ceiling():
    _, message = problems_of({"generate": {"max_new_tokens": 100, "max_new_tokens_ceiling": 10}})
    assert "exceeds max_new_tokens_ceiling" in message


def test_env_interpolation_and_default(monkeypatch):
    monkeypatch.setenv("BASTION_TEST_LR", "0.002")
    monkeypatch.delenv("BASTION_UNSET", raising=False)
    cfg = build_config({"train": {"lr": "${BASTION_TEST_LR}", "out_dir": "runs/${BASTION_UNSET:-fallback}/x"}})
    assert cfg.train.lr == 0.002
    assert cfg.train.out_dir == "runs/fallback/x"
    cfg = build_config({"train": {"run_name": "cost $${NOT_A_VAR}"}})
    assert cfg.train.run_name == "cost ${NOT_A_VAR}"


def test_unset_env_var_names_field_and_variable(monkeypatch):
    monkeypatch.delenv("BASTION_MISSING", raising=False)
    with pytest.raises(ConfigError) as info:
        build_config({"train": {"out_dir": "${BASTION_MISSING}"}})
    assert "train.out_dir" in str(info.value) and "BASTION_MISSING" in str(info.value)


def test_secrets_are_redacted_in_show_and_errors(monkeypatch):
    secret = "hf_s3cr3tValue12345"
    monkeypatch.setenv("MY_API_TOKEN", secret)
    cfg = build_config({"train": {"run_name": "${MY_API_TOKEN}"}, "data": {"sources": ["https://u:pw123@host/x"]}})
    shown = to_yaml(cfg)
    assert secret not in shown and REDACTED in shown
    assert "pw123" not in shown
    # pydantic would normally echo the bad input; neither the message nor problems may hold it.
    with pytest.raises(ConfigError) as info:
        build_config({"train": {"run_name": "${MY_API_TOKEN}", "batch_size": "${MY_API_TOKEN}"}})
    assert secret not in str(info.value)
    assert all(secret not in msg for _, msg in info.value.problems)
    with pytest.raises(ConfigError) as info:
        build_config({"train": {"run_name": "x" * 200 + "${MY_API_TOKEN}"}})
    assert secret not in str(info.value)


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=3e-4", "train.compile=true", "model.n_layer=2"])
    assert cfg.train.lr == 3e-4 and cfg.train.compile is True and cfg.model.n_layer == 2
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.no_such=1"])
    assert "train.no_such" in str(info.value)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.lr"])


def test_model_preset_expands_with_overrides():
    cfg = build_config({"model": {"preset": "tiny", "n_layer": 3}, "train": {"seq_len": 128}})
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64
    problems, message = problems_of({"model": {"preset": "gigantic"}})
    assert "is not a known preset" in message and "tiny" in message


@pytest.mark.parametrize(
    "content, expect",
    [
        ("train: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "mapping at the top level"),
        ("!!python/object/apply:os.system ['echo hi']", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path, content, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expect):
        load_config(path)


def test_missing_and_oversized_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 * 2**20))
    with pytest.raises(ConfigError, match="over the"):
        load_config(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"train:\n  run_name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "more than 10000 nodes"),  # ~420 bytes, 9**9 nodes if expanded
    ("x: " + "[" * 900 + "]" * 900 + "\n", "nested more than 32 levels"),
    ("x:\n" + "".join("  " * (i + 1) + "y:\n" for i in range(200)), "nested more than 32 levels"),
])
def test_yaml_bombs_stop_at_the_limit_with_one_line(tmp_path, text, message):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5  # refused while composing, not after expanding


def test_yaml_anchors_within_the_limit_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("train: &t {lr: 0.001, batch_size: 4}\nfinetune: {max_length: 512}\n")
    assert load_config(path).train.batch_size == 4


SECRET = "sk-live-4f9a8b7c"


def with_variable(data, name):
    """`data` with every ${V} naming the variable `name` instead."""
    return json.loads(json.dumps(data).replace("${V}", f"${{{name}}}"))


# (config, the variable's value, whether the message names the variable): every kind of
# message a value can reach - ours, the schema's checks across fields, presets, pydantic's.
ENV_CASES = [
    ({"model": {"preset": "${V}"}}, SECRET, True),
    ({"data": {"text_suffixes": [".txt", "${V}"]}}, SECRET, True),
    ({"data": {"text_suffixes": [".x${V}"]}}, "-Sk-Live-4F9A", True),  # inside a value, lower-cased by the field
    ({"finetune": {"lora": {"target_modules": ["wq", "${V}"]}}}, SECRET, True),
    ({"train": {"objective": "${V}"}}, "skliveabc", True),  # a cross-section check quotes it
    ({"model": {"d_model": "${V}", "n_head": 3}}, "0100", True),  # shown as the number it became
    ({"train": {"seq_len": "${V}"}}, "4096", True),
    ({"generate": {"max_new_tokens": "${V}"}}, "2000", True),
    ({"serve": {"host": "${V}"}}, "sk live 4f9a", True),
    ({"train": {"batch_size": "${V}"}}, SECRET, False),  # pydantic's own messages
    ({"train": {"run_name": "x" * 200 + "${V}"}}, SECRET, False),
    ({"serve": {"model_name": "${V}"}}, "-" + SECRET, False),
]


def assert_hidden(text, name, value, names_it):
    def squeezed(s):  # in any case, and wherever a terminal wrapped the line
        return "".join(s.split()).lower()

    for form in {value, value.strip("-"), str(int(value)) if value.isdigit() else value}:
        assert squeezed(form) not in squeezed(text)
    assert (squeezed(f"the value of ${{{name}}}") in squeezed(text)) == names_it


@pytest.mark.parametrize("name", ["OPENAI_KEY", "BASTION_SETTING"])  # secret-looking or not: never shown
@pytest.mark.parametrize("data, value, names_it", ENV_CASES)
def test_values_from_the_environment_are_never_shown_in_errors(monkeypatch, name, data, value, names_it):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        build_config(with_variable(data, name))
    assert_hidden(f"{info.value} {info.value.problems}", name, value, names_it)


@pytest.mark.parametrize("data, value, names_it", ENV_CASES)
def test_config_commands_name_the_variable_not_its_value(tmp_path, monkeypatch, data, value, names_it):
    import yaml
    from typer.testing import CliRunner

    from bastion.cli import app

    monkeypatch.setenv("BASTION_SETTING", value)
    monkeypatch.chdir(tmp_path)  # the output names the file: no digits of the temporary folder in it
    Path("c.yaml").write_text(yaml.safe_dump(with_variable(data, "BASTION_SETTING")))
    for command in (["config", "validate", "c.yaml"], ["config", "show", "c.yaml"], ["train", "-c", "c.yaml"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert_hidden(result.output, "BASTION_SETTING", value, names_it)


def test_config_show_redacts_a_secret_variable_and_names_it(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bastion.cli import app

    monkeypatch.setenv("OPENAI_KEY", SECRET)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  run_name: ${OPENAI_KEY}\n")
    result = CliRunner().invoke(app, ["config", "show", str(path)])
    assert result.exit_code == 0 and SECRET not in result.output
    assert f"run_name: '{REDACTED}(${{OPENAI_KEY}})'" in result.output


@pytest.mark.parametrize("name", ["OPENAI_KEY", "OPENAI_API_KEY", "HF_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                  "AWS_ACCESS_KEY_ID", "DB_PASSWORD", "DB_PASS", "MYSQL_PWD", "PGPASSWORD",
                                  "SSH_PRIVATE_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "BASIC_AUTH", "AUTHORIZATION",
                                  "APIKEY", "openaiKey", "SLACK_BOT_TOKEN", "SESSION_SECRET", "SENTRY_DSN",
                                  "BASTION_API_KEYS", "MONKEY"])
def test_secret_looking_variable_names(name):
    from bastion.config.load import is_secret_name

    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["PWD", "OLDPWD", "HOME", "TOKENIZER_PATH", "MAX_TOKENS", "KEYBOARD_LAYOUT",
                                  "GIT_AUTHOR_NAME", "AUTHOR", "DATA_DIR", "BASTION_RUNS", "PASSAGE_FILE", "KEYWORDS"])
def test_ordinary_variable_names(name):
    from bastion.config.load import is_secret_name

    assert not is_secret_name(name)


def test_show_redacts_secret_variables_and_names_them(monkeypatch):
    monkeypatch.setenv("OPENAI_KEY", SECRET)
    monkeypatch.setenv("SHORT_TOKEN", "ab")  # too short to search for elsewhere: redacted where it was put
    monkeypatch.setenv("RUNS_ROOT", "/srv/runs")
    cfg = build_config({"train": {"run_name": "${OPENAI_KEY}", "out_dir": "${RUNS_ROOT}/${OPENAI_KEY}/x",
                                  "data_dir": "data/${SHORT_TOKEN}"},
                        "data": {"text_suffixes": [".TXT${SHORT_TOKEN}"], "output_dir": "tab/ab"}})
    shown = to_yaml(cfg)
    assert SECRET not in shown and "${OPENAI_KEY}" in shown
    assert f"out_dir: /srv/runs/{REDACTED}(${{OPENAI_KEY}})/x" in shown  # a plain variable's value is shown
    assert f"data_dir: data/{REDACTED}(${{SHORT_TOKEN}})" in shown
    assert f".txt{REDACTED}(${{SHORT_TOKEN}})" in shown and "output_dir: tab/ab" in shown


def test_command_line_and_environment_text_is_typed_by_the_field(monkeypatch):
    monkeypatch.setenv("BIND", "0")
    cfg = build_config({"serve": {"host": "${BIND}"}}, ["train.run_name=007", "train.lr=3e-4", "train.compile=true",
                                                       "data.sources=[a, 'b c']", "train.max_steps=null",
                                                       "train.epochs=2", "serve.port=0"])
    assert cfg.serve.host == "0" and cfg.train.run_name == "007" and cfg.train.lr == 3e-4 and cfg.train.compile
    assert cfg.data.sources == ["a", "b c"] and cfg.train.max_steps is None and cfg.serve.port == 0
    for host in ("::", "0", "::1"):
        assert build_config({}, [f"serve.host={host}"]).serve.host == host
        assert build_config({}, values={"serve.host": host}).serve.host == host
    with pytest.raises(ConfigError, match="override data.sources is not valid YAML"):
        build_config({}, ["data.sources=[a"])


def test_overrides_never_change_the_callers_mapping():
    data = {"train": {"lr": 0.001}}
    build_config(data, ["train.batch_size=4"], values={"train.seed": 5})
    assert data == {"train": {"lr": 0.001}}


@pytest.mark.parametrize("host", ["[::1]", "a b", "-x.example", "x" * 64, "", "host/path", "1.2.3.4:80"])
def test_serve_host_is_an_address_or_a_host_name(host):
    problems, _ = problems_of({"serve": {"host": host}})
    assert "is not an IP address or a host name" in problems["serve.host"]
