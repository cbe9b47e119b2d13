"""serve.compile and serve.compile_cache: the config, the cache's wiring and its refusals
(fast), and `bastion serve --compile --compile-cache` as processes: cold, warm, tampered
(slow)."""
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from serving import free_port

from bastion.checkpoint.compile_cache import ARTIFACTS
from bastion.config import build_config
from bastion.config.schema import GenerateConfig, ModelConfig
from bastion.errors import ConfigError
from bastion.infer.engine import Engine
from bastion.infer.loading import load_for_inference
from bastion.model import Transformer
from bastion.serve.compiling import open_compile_cache


def serve_config(**serve):
    return build_config({"serve": {"compile": True, **serve}})


def test_compile_settings_are_checked():
    with pytest.raises(ConfigError, match="set serve.compile: true as well"):
        build_config({"serve": {"compile_cache": "/tmp/cache"}})
    with pytest.raises(ConfigError, match="serve.batch_mode is rowwise"):
        serve_config(batch_mode="rowwise")
    with pytest.raises(ConfigError, match="cannot serve serve.adapters"):
        serve_config(adapters={"a": "/tmp/a"})
    with pytest.raises(ConfigError, match="'ftp':// is not a store"):
        serve_config(compile_cache="ftp://host/cache")
    with pytest.raises(ConfigError, match="must not contain credentials") as caught:
        serve_config(compile_cache="s3://AKIAXX:hunter2@bucket/cache")
    assert "hunter2" not in str(caught.value)
    cfg = serve_config()
    with pytest.raises(ValueError, match="cannot serve serve.adapters"):  # `--adapter` assigns them later
        cfg.serve.adapters = {"a": "/tmp/a"}
    with pytest.raises(ValueError, match="needs the padded mode"):
        Engine(tiny_model(), None, GenerateConfig(), mode="dynamic", compile=True)


def tiny_model(**cfg):
    torch.manual_seed(0)
    shape = dict(vocab_size=300, d_model=16, n_layer=1, n_head=2, n_kv_head=1, max_seq_len=64, init_std=0.2)
    return Transformer(ModelConfig(**{**shape, **cfg})).eval()


def test_each_serving_build_gets_its_own_entry_and_a_bad_key_is_a_note(serve_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    loaded = load_for_inference(serve_checkpoint)
    cache_dir = str(tmp_path / "cache")
    names = set()
    for settings in ({}, {"max_concurrency": 4}, {"threads": 1}, {"dtype": "bfloat16"}):
        cache, notes = open_compile_cache(serve_config(compile_cache=cache_dir, **settings),
                                          load_for_inference(serve_checkpoint, dtype=settings.get("dtype", "float32")))
        assert notes == [] and cache.material["compile"]["what"] == "serve-decode-rows"
        names.add(cache.name)
        cache.close()
    assert len(names) == 4
    assert open_compile_cache(serve_config(), loaded) == (None, [])  # compile without a cache
    key = tmp_path / "shared.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    cache, notes = open_compile_cache(serve_config(compile_cache=cache_dir, compile_cache_key=str(key)), loaded)
    assert cache is None
    assert notes == [f"compile cache failed: compile cache not used: {key}: the compile-cache key is open to group or "
                     "others (mode 644); run chmod 600 on it"]


@pytest.mark.slow  # compiles (about 30 s on a shared 2-core CPU)
def test_a_tampered_entry_is_refused_then_compiled_cold_and_resealed(tmp_path, monkeypatch):
    """The engine's start with a cache whose entry was altered after sealing: a refusal in
    its notes, a cold compile, requests served, and a fresh entry sealed over the bad one."""
    from bastion.checkpoint.compile_cache import CompileCache, key_material, seal_entry

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    model = tiny_model()
    material = key_material(model.cfg.model_dump(mode="json"), {"what": "test"}, torch.device("cpu"))
    cache = CompileCache.open(str(tmp_path / "cache"), material)
    entry = seal_entry(tmp_path / "cache" / cache.name, b"not what was sealed", material, cache.key)
    (entry / ARTIFACTS).write_bytes(b"not what was sealeD")  # the store holds a tampered file
    tok = _tokenizer()
    limits = GenerateConfig(max_new_tokens=6, max_new_tokens_ceiling=6, temperature=0.0)
    with Engine(model, tok, limits, max_batch_size=1, threads=1, compile=True, compile_cache=cache) as engine:
        result = engine.submit([5, 6, 7], engine.params(3)).result(timeout=120)
    notes = engine.compile_notes
    assert notes[0].startswith("compile cache refused:") and "SHA-256" in notes[0], notes
    assert notes[1].startswith("compile done: decode step compiled"), notes
    assert notes[2].startswith("compile cache saved: sealed"), notes
    assert len(result.token_ids) == 6
    with Engine(model, tok, limits, max_batch_size=1, threads=1) as eager:
        assert eager.submit([5, 6, 7], eager.params(3)).result(timeout=120).token_ids == result.token_ids
    again = CompileCache.open(str(tmp_path / "cache"), material)
    assert again.load().kind == "hit"  # the new entry verifies
    again.close()


def _tokenizer():
    from bastion.tokenizer import BastionTokenizer

    return BastionTokenizer.train(["the quick brown fox jumps over the lazy dog"] * 8, vocab_size=300, min_frequency=1)


def start_serving(checkpoint, cache, env):
    """`bastion serve --compile --compile-cache CACHE` until /ready; (process, url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bastion.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--set", "serve.threads=1", "--set", "serve.max_concurrency=4",
                             "--compile", "--compile-cache", str(cache)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # a cold compile on a loaded 2-core machine
    while True:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            if proc.poll() is None:
                proc.kill()
            pytest.fail(f"bastion serve --compile (exit {proc.wait(30)}) never became ready:\n"
                        + proc.stderr.read()[-3000:])
        time.sleep(0.2)


def serve_once(checkpoint, cache, env) -> tuple[str, list[str]]:
    """One server's life: ready, /health, one greedy completion, SIGTERM; (its text, its
    compile notes from the server log)."""
    import signal

    proc, url = start_serving(checkpoint, cache, env)
    try:
        assert httpx.get(url + "/health").status_code == 200
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        reply = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": model, "prompt": "reverse: a b", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    notes = [line.removeprefix("bastion serve: ") for line in log.splitlines() if line.startswith("bastion serve: compile")]
    return reply.json()["choices"][0]["text"], notes


@pytest.mark.slow  # three servers, two of them compiling cold: minutes on a shared 2-core CPU
def test_serve_compile_cache_cold_warm_and_tampered(serve_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BASTION_API_KEYS"} | {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    cache = tmp_path / "cache"
    cold_text, cold = serve_once(serve_checkpoint, cache, env)
    assert [n.split(":")[0] for n in cold] == ["compile cache miss", "compile done", "compile cache saved"], cold
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert json.loads((entry / "seal.json").read_text())["kernels"], "no kernel libraries sealed"
    assert oct(os.stat(tmp_path / "xdg" / "bastion" / "compile-cache.key").st_mode & 0o777) == "0o600"

    warm_text, warm = serve_once(serve_checkpoint, cache, env)
    assert warm[0].startswith("compile cache hit: loaded") and warm[1].startswith("compile done"), warm
    assert warm_text == cold_text

    artifacts = entry / ARTIFACTS  # flip one byte: the manifest's SHA-256 no longer matches
    data = bytearray(artifacts.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifacts.write_bytes(bytes(data))
    tampered_text, tampered = serve_once(serve_checkpoint, cache, env)
    assert tampered[0].startswith("compile cache refused:") and "SHA-256" in tampered[0], tampered
    assert [n.split(":")[0] for n in tampered[1:]] == ["compile done", "compile cache saved"], tampered
    assert tampered_text == cold_text


def test_the_server_log_follows_whatever_stderr_is(monkeypatch):
    """serve() run in-process (a CLI runner, a notebook) may start under a temporary stderr
    that is closed later: its notes must still reach the current one, never a closed file."""
    import io
    import logging
    import sys

    from bastion.serve.server import _CurrentStderr

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logger = logging.getLogger("bastion.test-current-stderr")
    handler = _CurrentStderr()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logger.warning("compile cache hit")
        assert "compile cache hit" in second.getvalue()
    finally:
        logger.removeHandler(handler)
