import json
import os
import pickle
import stat

import pytest
import torch

from bastion.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, prune, resolve_checkpoint, save_checkpoint
from bastion.errors import CheckpointError


def make_ckpt(value: float = 1.0) -> Checkpoint:
    shared = torch.full((4, 3), value)
    return Checkpoint(
        model={"emb.weight": shared, "out.weight": shared, "norm.weight": torch.arange(3.0)},
        trainer_state={"step": 1, "sampler": {"epoch": 0, "position": 2}},
        config_yaml="model:\n  n_layer: 1\n",
        tokenizer_json='{"model": {}}',
        optimizer={"state.0.exp_avg": torch.zeros(4, 3), "state.0.step": torch.tensor(3.0)},
        optimizer_meta={"param_groups": "[]", "class": "AdamW"},
        rng={"torch_cpu": torch.get_rng_state()},
    )


def test_round_trip_restores_tensors_aliases_and_state(tmp_path):
    path = save_checkpoint(tmp_path, 7, make_ckpt(2.0))
    assert path.name == "step_00000007"
    loaded = load_checkpoint(tmp_path)
    assert loaded.directory == path
    assert torch.equal(loaded.model["emb.weight"], torch.full((4, 3), 2.0))
    # tied weights are stored once and come back as one tensor
    assert loaded.model["out.weight"].data_ptr() == loaded.model["emb.weight"].data_ptr()
    assert loaded.trainer_state["sampler"]["position"] == 2
    assert loaded.optimizer_meta == {"param_groups": "[]", "class": "AdamW"}
    assert torch.equal(loaded.rng["torch_cpu"], torch.get_rng_state())
    assert b"pickle" not in (path / "model.safetensors").read_bytes()[:200]


def test_tensor_files_are_streamed_in_standard_safetensors_layout(tmp_path):
    """The writer streams tensor by tensor; its files are what the safetensors library
    reads (every dtype, empty and 0-d tensors, non-contiguous views, metadata), every
    tensor starts at a multiple of its item size, and the manifest hashes the bytes written."""
    import hashlib

    import safetensors.torch

    from bastion.checkpoint.safetensors_check import parse_header

    base = torch.randn(6, 5)
    model = {
        "a.f32": base, "a.t": base.t(), "b.bf16": torch.randn(7, dtype=torch.bfloat16),
        "c.f16": torch.randn(3, 3).half(), "d.i64": torch.arange(5), "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.empty(0, 4), "g.scalar": torch.tensor(2.5), "h.i8": torch.tensor([-1, 2], dtype=torch.int8),
    }
    ckpt = make_ckpt()
    ckpt.model = model
    path = save_checkpoint(tmp_path, 1, ckpt)
    data = (path / "model.safetensors").read_bytes()
    header, _ = parse_header(data, "model.safetensors")
    for name, info in header.items():
        assert info["data_offsets"][0] % model[name].element_size() == 0, name
    theirs = safetensors.torch.load(data)  # security-reviewed: safetensors (no code), a file this test wrote
    assert theirs.keys() == model.keys()
    assert all(torch.equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in model.items())
    manifest = json.loads((path / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        content = (path / name).read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert safetensors.torch.load_file(path / "optimizer.safetensors").keys() == ckpt.optimizer.keys()


def test_a_tensor_the_format_cannot_hold_is_refused_and_nothing_is_committed(tmp_path):
    save_checkpoint(tmp_path, 1, make_ckpt())
    bad = make_ckpt()
    bad.model["z.complex"] = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(CheckpointError, match="z.complex"):
        save_checkpoint(tmp_path, 2, bad)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert load_checkpoint(tmp_path).directory.name == "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no half-written folder left


def test_owner_only_permissions(tmp_path):
    path = save_checkpoint(tmp_path / "ck", 1, make_ckpt())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "ck").st_mode) == 0o700
    for child in path.iterdir():
        assert stat.S_IMODE(os.stat(child).st_mode) == 0o600, child


def test_latest_pointer_and_retention(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, make_ckpt(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert resolve_checkpoint(tmp_path).name == "step_00000004"
    assert load_checkpoint(tmp_path).model["norm.weight"].tolist() == [0.0, 1.0, 2.0]
    # a crashed save leaves only a hidden temp dir, which is never a checkpoint and is cleaned
    (tmp_path / ".tmp-step_00000005-999").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step_00000004"
    prune(tmp_path, 2)
    assert not (tmp_path / ".tmp-step_00000005-999").exists()


def test_resaving_same_step_replaces_atomically(tmp_path):
    save_checkpoint(tmp_path, 5, make_ckpt(1.0))
    save_checkpoint(tmp_path, 5, make_ckpt(9.0))
    assert load_checkpoint(tmp_path).model["emb.weight"][0, 0].item() == 9.0
    assert len(list(tmp_path.iterdir())) == 2  # step dir + latest


def tamper(path, name, data: bytes):
    os.chmod(path / name, 0o600)
    (path / name).write_bytes(data)


@pytest.mark.parametrize(
    "attack, message",
    [
        ("flip_byte", "SHA-256 does not match"),
        ("truncate", "size"),
        ("extra_file", "not listed"),
        ("missing_file", "missing"),
        ("symlink", "symbolic links"),
        ("pickle_file", "pickle"),
        ("manifest_edited_to_match", "SHA-256 does not match"),
        ("no_manifest", "no MANIFEST.json"),
        ("manifest_path_escape", "unsafe file"),
    ],
)
def test_tampered_checkpoints_are_refused(tmp_path, attack, message):
    path = save_checkpoint(tmp_path / "ck", 1, make_ckpt())
    weights = path / "model.safetensors"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    if attack == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        tamper(path, "model.safetensors", bytes(data))
    elif attack == "truncate":
        tamper(path, "model.safetensors", weights.read_bytes()[:-4])
    elif attack == "extra_file":
        (path / "notes.txt").write_text("hi")
    elif attack == "missing_file":
        (path / "tokenizer.json").unlink()
    elif attack == "symlink":
        outside = tmp_path / "outside.txt"
        outside.write_text("secret")
        (path / "evil.json").symlink_to(outside)
    elif attack == "pickle_file":
        (path / "extra.pt").write_bytes(pickle.dumps({"a": 1}))
    elif attack == "manifest_edited_to_match":
        # attacker rewrites the weights and fixes the size, but not every hash
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        tamper(path, "model.safetensors", bytes(data))
        manifest["files"]["model.safetensors"]["size"] = len(data)
        tamper(path, "MANIFEST.json", json.dumps(manifest).encode())
    elif attack == "no_manifest":
        (path / "MANIFEST.json").unlink()
    elif attack == "manifest_path_escape":
        manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
        tamper(path, "MANIFEST.json", json.dumps(manifest).encode())
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_pickle_checkpoint_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(bad)
    assert not sentinel.exists()


def test_no_verify_skips_hash_check_only_when_asked(tmp_path):
    path = save_checkpoint(tmp_path, 1, make_ckpt())
    data = bytearray((path / "tokenizer.json").read_bytes())
    data[2:3] = b"M"
    tamper(path, "tokenizer.json", bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False).tokenizer_json.startswith('{"M')


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="latest"):
        load_checkpoint(tmp_path)


def test_retention_keeps_last_best_and_every_k(tmp_path):
    from bastion.checkpoint import Retention

    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 0.5, 5: 2.0, 6: 4.0, 7: 3.5, 8: 3.9}
    for step, loss in losses.items():
        ckpt = make_ckpt(step)
        ckpt.trainer_state = {"step": step, "val_loss": loss}
        save_checkpoint(tmp_path, step, ckpt, retention=Retention(keep_last=2, keep_best=2, keep_every=3))
    kept = [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path)]
    # last 2: 7, 8; best 2 by val loss: 4 (0.5), 2 (1.0); every 3rd: 3, 6
    assert kept == [2, 3, 4, 6, 7, 8]


def test_retention_never_deletes_what_latest_names(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, make_ckpt(step))
    (tmp_path / "latest").write_text("step_00000001\n")  # e.g. a user pinned an older one
    prune(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003"]


def test_dangling_latest_falls_back_to_newest_committed(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, make_ckpt(step))
    (tmp_path / "latest").write_text("step_00000009\n")  # a crash between two renames
    assert resolve_checkpoint(tmp_path).name == "step_00000002"


def test_links_in_a_run_are_never_followed(tmp_path):
    """`latest` naming a step folder that is a link, a linked step folder, a linked
    checkpoints/ folder: each could lead outside the run, none is resolved."""
    outside = save_checkpoint(tmp_path / "elsewhere", 7, make_ckpt(7))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", 1, make_ckpt(1))
    (run / "checkpoints" / "step_00000009").symlink_to(outside, target_is_directory=True)
    (run / "checkpoints" / "latest").write_text("step_00000009\n")
    assert resolve_checkpoint(run).name == "step_00000001"  # the newest real one, not the link
    assert resolve_checkpoint(run / "checkpoints").name == "step_00000001"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001"]
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(run / "checkpoints" / "step_00000009")

    linked_run = tmp_path / "linked_run"
    linked_run.mkdir()
    (linked_run / "checkpoints").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(linked_run)


def test_latest_pointer_that_is_a_link_or_huge_is_ignored(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, make_ckpt(step))
    (tmp_path / "latest").unlink()
    (tmp_path / "elsewhere").write_text("step_00000001\n")
    (tmp_path / "latest").symlink_to(tmp_path / "elsewhere")
    assert resolve_checkpoint(tmp_path).name == "step_00000002"
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").write_text("step_00000001\n" + " " * 300)  # more than a pointer ever holds
    assert resolve_checkpoint(tmp_path).name == "step_00000002"
