"""train.compile_cache end to end, with real compiles (slow: each cold compile of the tiny
model takes one to a few minutes on a shared 2-core CPU). Every run is a fresh process, so
nothing but the cache folder and the key carries over. A second run loads what the first
sealed and trains identically; a tampered entry, an entry sealed by another key, an entry
without its manifest and an entry for another model config are each refused (or missed),
compiled from scratch, and the run succeeds. The refusals themselves, and that PyTorch never
reads a refused byte, are in tests/checkpoint/test_compile_cache.py (fast)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.checkpoint.compile_cache import ARTIFACTS, SEAL, load_or_create_key, seal_entry
from bastion.checkpoint.manifest import MANIFEST
from bastion.config import build_config

pytestmark = pytest.mark.slow

CHILD = """
import json, sys
from bastion.config import build_config
from bastion.train import train
cfg = build_config(json.loads(sys.argv[1]))
result = train(cfg, quiet=True)
print(json.dumps({"events": result.compile_cache, "losses": result.losses, "steps": result.steps}))
"""


def run(data, tmp_path, name, cache, *, config_home="config", **model):
    settings = {"model": {"d_model": 32, "n_layer": 1, "n_head": 2, "max_seq_len": 32, "dropout": 0.0, **model},
                "train": {"data_dir": str(data), "out_dir": str(tmp_path / name), "seq_len": 32, "batch_size": 4,
                          "max_steps": 2, "eval_every": 2, "eval_batches": 1, "log_every": 1, "threads": 1,
                          "device": "cpu", "compile": True, "compile_cache": str(cache)},
                "checkpoint": {"every_steps": 2, "keep_last": 1}}
    build_config(settings)  # a bad config fails here, not in the child
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / config_home), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    print(name, result["events"])  # (-s shows how far a long run got)
    return result


def kinds(result):
    return [event.split(":", 1)[0] for event in result["events"]]


def entries(cache: Path):
    return [p for p in cache.iterdir() if (p / MANIFEST).is_file()]


def test_second_run_loads_the_cache_and_bad_entries_are_recompiled(arithmetic_data, tmp_path):
    cache = tmp_path / "cache"
    cold = run(arithmetic_data, tmp_path, "cold", cache)
    assert kinds(cold)[0] == "miss" and "saved" in kinds(cold), cold["events"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    key = tmp_path / "config" / "bastion" / "compile-cache.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().strip() not in "".join(p.read_text(errors="replace") for p in cache.rglob("*") if p.is_file())
    [entry] = entries(cache)

    warm = run(arithmetic_data, tmp_path, "warm", cache)
    assert kinds(warm)[0] == "hit", warm["events"]
    assert warm["losses"] == cold["losses"]

    blob = bytearray((entry / ARTIFACTS).read_bytes())
    blob[len(blob) // 2] ^= 1
    (entry / ARTIFACTS).write_bytes(bytes(blob))
    tampered = run(arithmetic_data, tmp_path, "tampered", cache)
    assert kinds(tampered)[0] == "refused" and "SHA-256" in tampered["events"][0]
    assert "saved" in kinds(tampered) and tampered["losses"] == cold["losses"]  # recompiled, entry resealed

    other_key = run(arithmetic_data, tmp_path, "other-key", cache, config_home="config2")
    assert kinds(other_key)[0] == "refused" and "another key" in other_key["events"][0]
    assert other_key["losses"] == cold["losses"]

    # This very entry, resealed with our key but for another torch: refused, not loaded.
    material = json.loads((entry / SEAL).read_bytes())["material"]
    seal_entry(entry, (entry / ARTIFACTS).read_bytes(), {**material, "torch": "2.12.0"}, load_or_create_key(key))
    other_torch = run(arithmetic_data, tmp_path, "other-torch", cache)
    assert kinds(other_torch)[0] == "refused" and "differs in: torch" in other_torch["events"][0]
    assert other_torch["losses"] == cold["losses"]

    (entry / MANIFEST).unlink()  # an entry without its manifest is not an entry
    no_manifest = run(arithmetic_data, tmp_path, "no-manifest", cache)
    assert kinds(no_manifest)[0] == "miss" and "saved" in kinds(no_manifest)

    other_model = run(arithmetic_data, tmp_path, "other-model", cache, d_model=48)
    assert kinds(other_model)[0] == "miss" and "saved" in kinds(other_model)
    assert len(entries(cache)) == 2  # one entry per build
