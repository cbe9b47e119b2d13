"""Malformed checkpoint files, through the real CLI: every command that reads, packs, pushes or
loads a checkpoint answers each with exit status 2 and one line naming the file - never a
traceback, never a native crash - and writes nothing. The manifest is re-forged to match
every time: only format checks can catch these (bastion/checkpoint/formats.py)."""
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from bastion.checkpoint.formats import FileCheck, check_file
from bastion.checkpoint.stores import LocalStore
from bastion.cli import app
from bastion.errors import CheckpointError
from helpers import make_base_checkpoint

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def forge(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Replace (or add) a file AND fix its manifest entry."""
    path = ckpt_dir / name
    if path.exists():
        os.chmod(path, 0o600)
    path.write_bytes(data)
    manifest = json.loads((ckpt_dir / "MANIFEST.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    os.chmod(ckpt_dir / "MANIFEST.json", 0o600)
    (ckpt_dir / "MANIFEST.json").write_text(json.dumps(manifest))


def safetensors_bytes(entries: dict, data: bytes = b"") -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + data


def huge(shape: list) -> bytes:
    return safetensors_bytes({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})


def long_number() -> bytes:
    """A header whose offset has 5,000 digits (json.loads refuses to convert it: ValueError)."""
    header = b'{"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 1' + b"0" * 5000 + b"]}}"
    return struct.pack("<Q", len(header)) + header


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base_checkpoint(tmp_path_factory.mktemp("base"))


def model_bytes(base: Path, cut: int) -> bytes:
    return (base / "model.safetensors").read_bytes()[:cut]


HOSTILE = {  # name: (file, bytes from the base checkpoint's folder, what the one line says)
    "empty model": ("model.safetensors", lambda b: b"", "too short"),
    "truncated model": ("model.safetensors", lambda b: model_bytes(b, 1000), "header declares"),
    "pickle as model": ("model.safetensors", lambda b: pickle.dumps({"w": [1.0] * 10}), "over the"),
    "dimension past int64": ("model.safetensors", lambda b: huge([2**63, 0]), "element limit"),
    "dimensions overflowing": ("model.safetensors", lambda b: huge([2**40, 2**40, 0]), "element limit"),
    "5000-digit offset": ("model.safetensors", lambda b: long_number(), "number too long"),
    "non-UTF-8 tokenizer": ("tokenizer.json", lambda b: b'{"model": "\xff\xfe"}', "not valid UTF-8"),
    "tokenizer not an object": ("tokenizer.json", lambda b: b"[1, 2]", "not a JSON object"),
    "non-UTF-8 trainer_state": ("trainer_state.json", lambda b: b'{"step": "\xff"}', "not valid UTF-8"),
    "5000-digit YAML int": ("config.yaml", lambda b: b"model: {d_model: 1" + b"0" * 5000 + b"}\n", "not valid YAML"),
    "YAML list as config": ("config.yaml", lambda b: b"- 1\n- 2\n", "not a YAML mapping"),
    "unknown file listed": ("notes.json", lambda b: b"{}", "not a file a Bastion checkpoint holds"),
}


def hostile_checkpoint(base: Path, root: Path, case: str) -> Path:
    name, make, _ = HOSTILE[case]
    path = root / case.replace(" ", "_") / base.name
    shutil.copytree(base, path)
    os.chmod(path, 0o700)
    forge(path, name, make(base))
    return path


def assert_one_line_error(result, *needles: str) -> None:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.exception, result.output[-500:])
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return path


COMMANDS = {  # name: argv for a checkpoint folder and a scratch folder
    "ckpt verify": lambda ck, t: ["ckpt", "verify", str(ck)],
    "ckpt inspect": lambda ck, t: ["ckpt", "inspect", str(ck)],
    "ckpt pack": lambda ck, t: ["ckpt", "pack", str(ck), str(t / "packed")],
    "ckpt push": lambda ck, t: ["ckpt", "push", str(ck), str(t / "store")],
    "generate": lambda ck, t: ["generate", "--checkpoint", str(ck), "-p", "hi", "--max-new-tokens", "2"],
    "export hf": lambda ck, t: ["export", "hf", str(ck), str(t / "hf")],
    "export gguf": lambda ck, t: ["export", "gguf", str(ck), str(t / "model.gguf")],
    "eval loss": lambda ck, t: ["eval", "loss", "--checkpoint", str(ck), "--file", str(chat_file(t)),
                                "--root", str(t)],
    "merge": lambda ck, t: ["merge", str(ck), str(ck), str(t / "merged")],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_hostile_file_is_one_line_from_every_command(base, tmp_path, command):
    for case, (name, _, message) in HOSTILE.items():
        scratch = tmp_path / f"out-{case.replace(' ', '_')}"
        scratch.mkdir()
        ckpt = hostile_checkpoint(base, tmp_path, case)
        result = runner.invoke(app, COMMANDS[command](ckpt, scratch))
        assert_one_line_error(result, name, message)
        written = [p for p in scratch.rglob("*") if not p.is_dir() and p.name != "held_out.jsonl"]
        assert written == [], case


def test_huge_dimensions_no_native_frames_in_a_real_process(base, tmp_path):
    ckpt = hostile_checkpoint(base, tmp_path, "dimension past int64")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bastion.cli", "generate", "--checkpoint", str(ckpt), "-p", "hi"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "frame #" not in proc.stderr, proc.stderr[-2000:]
    assert "element limit" in proc.stderr


def test_pull_refuses_a_forged_checkpoint_in_the_store(base, tmp_path):
    """A store is written by others: what a pull downloads is checked by format too."""
    store = LocalStore(tmp_path / "store")
    forged = hostile_checkpoint(base, tmp_path, "pickle as model")
    shutil.copytree(forged, tmp_path / "store" / "step_00000000")
    with pytest.raises(CheckpointError, match="model.safetensors: header declares"):
        store.pull("step_00000000", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "pulled.part").exists()


@pytest.fixture(scope="module")
def with_optimizer(base, tmp_path_factory) -> Path:
    ckpt = load_checkpoint(base)
    ckpt.optimizer = {name: torch.zeros_like(t) for name, t in ckpt.model.items()}
    return save_checkpoint(tmp_path_factory.mktemp("opt"), 1, ckpt)


def test_file_not_needed_by_a_load_is_verified_too(with_optimizer, tmp_path):
    """generate and export read no optimizer state; a flipped byte in it is still an error."""
    path = tmp_path / "ck"
    shutil.copytree(with_optimizer, path)
    os.chmod(path / "optimizer.safetensors", 0o600)
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0x01
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: SHA-256 does not match"):
        load_checkpoint(path, load_optimizer=False)
    load_checkpoint(path, load_optimizer=False, verify=False)  # --no-verify stays explicit
    for command in ("generate", "export hf"):
        result = runner.invoke(app, COMMANDS[command](path, tmp_path))
        assert_one_line_error(result, "optimizer.safetensors", "SHA-256 does not match")


def test_file_check_streams_in_any_blocks(with_optimizer):
    """The streaming check sees what a whole read sees, however the bytes are cut."""
    manifest = verify_checkpoint(with_optimizer)
    for name, entry in manifest["files"].items():
        data = (with_optimizer / name).read_bytes()
        whole = check_file(with_optimizer / name, entry)
        for block in (1, 7, 4096):
            check = FileCheck(with_optimizer / name, entry)
            for start in range(0, len(data), block):
                check.update(data[start : start + block])
            assert check.finish() == whole, (name, block)
    with pytest.raises(CheckpointError, match="more than the"):
        FileCheck(with_optimizer / "config.yaml", manifest["files"]["config.yaml"]).update(b"x" * 10**6)


def test_oversized_json_refused_before_reading(base, tmp_path):
    path = hostile_checkpoint(base, tmp_path, "tokenizer not an object")
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["trainer_state.json"]["size"] = 65 * 2**20  # claims more than any JSON Bastion reads
    with pytest.raises(CheckpointError, match="over the 67108864-byte limit"):
        FileCheck(path / "trainer_state.json", manifest["files"]["trainer_state.json"])
