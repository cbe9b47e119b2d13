"""train.compile_cache's wiring around the loop, without compiling (the end-to-end runs are
in test_compile_cache_run.py, slow)."""
import pytest
import torch

from bastion.config import build_config
from bastion.errors import ConfigError
from bastion.train.compiling import RunCompileCache
from bastion.train.distributed import DistEnv


def config(tmp_path, **train):
    return build_config({"model": {"preset": "tiny", "vocab_size": 300},
                         "train": {"out_dir": str(tmp_path / "run"), "compile": True, "seq_len": 64,
                                   "compile_cache": str(tmp_path / "cache"), **train}})


def test_compile_cache_needs_compile_and_a_store_url_without_credentials():
    with pytest.raises(ConfigError, match="set train.compile: true"):
        build_config({"train": {"compile_cache": "/tmp/cache"}})
    with pytest.raises(ConfigError, match="'ftp':// is not a store"):
        build_config({"train": {"compile": True, "compile_cache": "ftp://host/cache"}})
    with pytest.raises(ConfigError, match="must not contain credentials") as caught:
        build_config({"train": {"compile": True, "compile_cache": "s3://AKIAXX:hunter2@bucket/cache"}})
    assert "hunter2" not in str(caught.value)


def test_an_unusable_key_is_reported_and_the_run_goes_on_uncached(tmp_path):
    key = tmp_path / "shared.key"
    key.write_text("ab" * 32)
    key.chmod(0o644)
    with RunCompileCache.open(config(tmp_path, compile_cache_key=str(key)), torch.device("cpu"), DistEnv(), False) as run:
        assert run.cache is None
        assert run.notes() == [f"compile cache failed: compile cache not used: {key}: the compile-cache key is open "
                               "to group or others (mode 644); run chmod 600 on it"]
        run.save(print)  # nothing to save, nothing raised


def test_each_build_gets_its_own_entry_and_rank_zero_alone_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    cpu, single = torch.device("cpu"), DistEnv()
    names = set()
    for cfg, bf16 in [(config(tmp_path), False), (config(tmp_path), True), (config(tmp_path, seq_len=128), False),
                      (config(tmp_path, batch_size=4), False)]:
        run = RunCompileCache.open(cfg, cpu, single, bf16)
        names.add(run.cache.name)
        assert run.saves
        run.cache.close()
    assert len(names) == 4
    other_rank = RunCompileCache.open(config(tmp_path), cpu, DistEnv(rank=1, world=2), False)
    assert not other_rank.saves and other_rank.cache.name not in names  # (world size is part of the key)
    other_rank.cache.close()
    assert not RunCompileCache.open(config(tmp_path, compile=False, compile_cache=None), cpu, single, False).cache
