"""Multi-LoRA serving: one base, verified adapter folders served beside it under their own
model names, routed per request, refused at startup unless they belong to the served base."""
import json
import shutil
import threading

import httpx
import openai
import pytest
import torch
from helpers import make_adapter_folder, make_base_checkpoint
from serving import API_KEY, running

from bastion.adapters.merge import merge_checkpoint
from bastion.checkpoint.contents import manifest_sha256
from bastion.config import build_config
from bastion.config.schema import GenerateConfig
from bastion.errors import CheckpointError, ConfigError, DataError
from bastion.infer import generate
from bastion.infer.generate import generate_chat
from bastion.infer.loading import load_for_inference
from bastion.model.multi_lora import multi_lora_modules
from bastion.serve.cli import add_adapter_options
from bastion.serve.server import build_state

ENV = {"BASTION_API_KEYS": API_KEY}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = GenerateConfig(max_new_tokens=12, max_new_tokens_ceiling=64, temperature=0.0)
PROMPTS = ["reverse: a b c", "greet kalomi", "hello"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base, two adapters trained (randomly) on it, and each merged into the base as
    `bastion merge` does: the reference a request to the adapter must reproduce."""
    root = tmp_path_factory.mktemp("multi_lora")
    base = make_base_checkpoint(root / "base", seed=1, init_std=0.2)
    adapters = {"alpha": make_adapter_folder(base, root / "alpha", seed=1),
                "beta.v2": make_adapter_folder(base, root / "beta", rank=8, targets=("wq", "wk", "wo", "w1", "w3"),
                                               seed=2)}
    merged = {name: merge_checkpoint(base, folder, root / f"merged-{name}") for name, folder in adapters.items()}
    return root, base, adapters, merged


@pytest.fixture(scope="module")
def server(files):
    root, base, adapters, _ = files
    serve = {"adapters": {name: str(path) for name, path in adapters.items()},
             "rate_limit": {"requests_per_minute": 10_000, "tokens_per_minute": 10_000_000}}
    with running(base, environ=ENV, serve=serve, data={"allowed_roots": [str(root)]}) as (url, state):
        yield url, state


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def reference(files, model, prompt, chat=False):
    """The text `bastion generate` gives: the merged checkpoint (or the base), greedy."""
    _, base, _, merged = files
    loaded = load_for_inference(merged.get(model, base))
    if chat:
        return generate_chat(loaded.model, loaded.chat, [{"role": "user", "content": prompt}], limits=GREEDY).text
    return generate(loaded.model, loaded.tokenizer, prompt, limits=GREEDY).text


def config(files, adapters, **serve):
    root = files[0]
    return build_config({"serve": {"adapters": {k: str(v) for k, v in adapters.items()}, **serve},
                         "data": {"allowed_roots": [str(root)]}})


# ---- serving ------------------------------------------------------------------------------------

def test_models_lists_the_base_and_each_adapter(server):
    url, state = server
    assert [m.id for m in client(url).models.list().data] == [state.model_name, "alpha", "beta.v2"]
    data = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
    assert data[0]["parent"] is None and data[0]["root"] == state.model_name
    assert all(m["parent"] == m["root"] == state.model_name and m["object"] == "model" for m in data[1:])
    assert not any("/" in str(v) for m in data for v in m.values())  # no file paths


@pytest.mark.parametrize("model", ["alpha", "beta.v2", None])
def test_requests_run_the_adapter_they_name(server, files, model):
    """Greedy text from the server = `bastion generate` on the merged checkpoint (the base
    for the base's name), completions and chat, through the official client."""
    url, state = server
    name = model or state.model_name
    c = client(url)
    for prompt in PROMPTS:
        done = c.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert done.model == name and done.choices[0].text == reference(files, model, prompt), prompt
    chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "greet kalomi"}],
                                     max_tokens=12, temperature=0)
    assert chat.model == name and chat.choices[0].message.content == reference(files, model, "greet kalomi", chat=True)


def test_adapters_change_the_text(files):
    texts = {reference(files, model, PROMPTS[0]) for model in ("alpha", "beta.v2", None)}
    assert len(texts) == 3


def test_streaming_names_the_adapter(server):
    url, _ = server
    args = dict(model="beta.v2", prompt="hello", max_tokens=10, temperature=0)
    whole = client(url).completions.create(**args)
    chunks = list(client(url).completions.create(**args, stream=True))
    assert {ch.model for ch in chunks} == {"beta.v2"}
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text


def test_mixed_concurrent_requests_are_batch_invariant(server):
    """Requests for the base and both adapters at once share decode steps (the default
    padded mode): each gets the tokens it gets alone, sampled ones included."""
    url, state = server
    bodies = [{"model": model, "prompt": prompt, "max_tokens": 16, "temperature": temperature, "seed": 11}
              for model in (state.model_name, "alpha", "beta.v2") for prompt in PROMPTS[:2] for temperature in (0, 1)]
    alone = [httpx.post(url + "/v1/completions", json=b, headers=AUTH, timeout=60).json() for b in bodies]
    together: list = [None] * len(bodies)

    def send(i):
        together[i] = httpx.post(url + "/v1/completions", json=bodies[i], headers=AUTH, timeout=60).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
    assert [r["model"] for r in together] == [b["model"] for b in bodies]


def test_unknown_model_is_404_naming_the_served_ones(server):
    url, state = server
    r = httpx.post(url + "/v1/completions", json={"model": "gamma", "prompt": "hi"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'alpha'" in r.json()["error"]["message"] and f"'{state.model_name}'" in r.json()["error"]["message"]


def test_metrics_and_access_log_name_the_model(server):
    url, state = server
    httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}, headers=AUTH)
    text = httpx.get(url + "/metrics", headers=AUTH).text
    assert 'bastion_model_requests_total{model="alpha"}' in text
    records = [json.loads(line) for line in state.log.path.read_text().splitlines()]
    assert any(r["model"] == "alpha" and r["path"] == "/v1/completions" and r["status"] == 200 for r in records)


# ---- startup refusals ---------------------------------------------------------------------------

def test_an_adapter_of_another_base_is_refused(files, tmp_path):
    root, base, adapters, _ = files
    other = make_base_checkpoint(root / "other-base", seed=2, init_std=0.2)
    foreign = make_adapter_folder(other, root / "foreign")
    with pytest.raises(CheckpointError) as err:
        build_state(base, config(files, {"alpha": adapters["alpha"], "foreign": foreign}), environ={})
    message = str(err.value)
    assert "'foreign'" in message and manifest_sha256(other) in message and manifest_sha256(base) in message


def test_a_tampered_adapter_is_refused(files):
    root, base, adapters, _ = files
    copy = shutil.copytree(adapters["alpha"], root / "tampered")
    data = bytearray((copy / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        build_state(base, config(files, {"tampered": copy}), environ={})


@pytest.mark.parametrize("shape,match", [({"d_model": 32}, "does not fit the base"),
                                         ({"n_layer": 3}, "has no module in the base model")])
def test_an_adapter_that_does_not_fit_the_base_is_refused(files, shape, match):
    root, base, _, _ = files
    # Claims the right base (its manifest hash) but was made for another shape.
    odd = make_adapter_folder(base, root / f"odd-{next(iter(shape.values()))}", base_sha=manifest_sha256(base), **shape)
    with pytest.raises(CheckpointError, match=match):
        build_state(base, config(files, {"odd": odd}), environ={})


def test_adapter_names_and_counts_are_checked(files, server):
    _, base, adapters, _ = files
    alpha = adapters["alpha"]
    for bad in ("bad name", "../x", "-x", "a/b", "x" * 65, ""):
        with pytest.raises(ConfigError, match="adapter name"):
            config(files, {bad: alpha})
    with pytest.raises(ConfigError, match="over serve.max_adapters"):
        config(files, {"a": alpha, "b": alpha}, max_adapters=1)
    with pytest.raises(ConfigError, match="base model's name"):
        config(files, {"tiny": alpha}, model_name="tiny")
    _, state = server  # the base's name derived from its folder clashes too
    with pytest.raises(ConfigError, match="base model's name"):
        build_state(base, config(files, {state.model_name: alpha}), environ={})


def test_adapter_paths_are_confined_and_need_a_verified_base(files):
    root, base, adapters, _ = files
    cfg = build_config({"serve": {"adapters": {"alpha": str(adapters["alpha"])}},
                        "data": {"allowed_roots": [str(root / "elsewhere")]}})
    with pytest.raises(DataError, match="outside the allowed roots"):
        build_state(base, cfg, environ={})
    with pytest.raises(DataError, match="'..'"):
        build_state(base, config(files, {"alpha": f"{root}/x/../alpha"}), environ={})
    with pytest.raises(ConfigError, match="--no-verify"):
        build_state(base, config(files, {"alpha": adapters["alpha"]}), environ={}, verify=False)


def test_adapter_command_line_options(files):
    _, _, adapters, _ = files
    cfg = config(files, {"alpha": adapters["alpha"]})
    add_adapter_options(cfg, [f"beta={adapters['beta.v2']}"])
    assert list(cfg.serve.adapters) == ["alpha", "beta"]
    for options, match in ((["nopath"], "NAME=PATH"), (["=x"], "NAME=PATH"), (["alpha=x"], "already set"),
                           (["bad name=x"], "adapter name"), ([f"b{i}=x" for i in range(8)], "max_adapters")):
        with pytest.raises(ConfigError, match=match):
            add_adapter_options(config(files, {"alpha": adapters["alpha"]}), options)


def test_no_adapters_inserts_nothing(files):
    _, base, _, _ = files
    state = build_state(base, build_config({}), environ={})
    assert state.adapters == () and not multi_lora_modules(state.loaded.model) and state.engine._adapters is None


@torch.no_grad()
def test_adapters_on_an_int8_base(files):
    """--quantize int8: the adapters run unquantized beside the quantized base layers
    (CPU int8 kernels); the text is close to, not equal to, the merged float model's."""
    _, base, adapters, _ = files
    state = build_state(base, config(files, {"alpha": adapters["alpha"]}), environ={}, quantize="int8")
    layer = multi_lora_modules(state.loaded.model)["layers.0.attention.wq"]
    assert type(layer.base).__name__ == "CpuInt8Linear"
    ids = torch.tensor([state.loaded.tokenizer.encode("reverse: a b c")])
    model = state.loaded.model
    plain = model(ids)[0]
    with model.served_adapters.rows([1]):
        adapted = model(ids)[0]
    reference_model = load_for_inference(files[3]["alpha"]).model
    assert not torch.equal(plain, adapted)
    assert (adapted - reference_model(ids)[0]).abs().max() < (plain - reference_model(ids)[0]).abs().max()


def test_serve_command_takes_repeated_adapter_options(files, monkeypatch):
    """`bastion serve --adapter NAME=PATH` (repeatable) reaches the config the server starts
    with, beside the config file's serve.adapters; a malformed one is a usage error."""
    from typer.testing import CliRunner

    import bastion.serve.server
    from bastion.cli import app

    root, base, adapters, _ = files
    started = {}
    monkeypatch.setattr(bastion.serve.server, "serve", lambda checkpoint, cfg, **kw: started.update(cfg=cfg))
    (root / "serve.yaml").write_text(json.dumps({"serve": {"adapters": {"alpha": str(adapters["alpha"])}},
                                                 "data": {"allowed_roots": [str(root)]}}))
    args = ["serve", "--checkpoint", str(base), "--config", str(root / "serve.yaml"),
            "--adapter", f"beta={adapters['beta.v2']}", "--adapter", f"gamma={adapters['alpha']}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(started["cfg"].serve.adapters) == ["alpha", "beta", "gamma"]
    result = CliRunner().invoke(app, [*args[:5], "--adapter", "no-path"])
    assert result.exit_code != 0 and "NAME=PATH" in result.output
