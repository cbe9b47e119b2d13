"""`bastion ckpt convert --allow-pickle`: honest torch.save files convert; hostile ones are
refused by the static scan before any unpickling, so their payload never runs."""
import os
import pickle
import zipfile

import pytest
import torch

from bastion.checkpoint import verify_checkpoint
from bastion.checkpoint.convert import convert_pickle, scan_pickle
from bastion.errors import CheckpointError


class WritesSentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bastion-pwned",))


def torch_zip(tmp_path, payload: bytes, name="model.pt", member="archive/data.pkl"):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("archive/version", "3\n")
    return path


def test_honest_state_dict_converts_and_verifies(tmp_path):
    sd = {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16), "n": torch.tensor(7)}
    src = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": sd, "epoch": 3}, src)
    out = convert_pickle(src, tmp_path / "converted", allow_pickle=True)
    verify_checkpoint(out)
    from safetensors.torch import load_file

    loaded = load_file(out / "model.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_requires_explicit_opt_in(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, src)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert_pickle(src, tmp_path / "out")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_code_executing_pickles_refused_before_loading(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    src = torch_zip(tmp_path, pickle.dumps({"w": WritesSentinel(str(sentinel))}, protocol=protocol))
    with pytest.raises(CheckpointError, match="not a tensor-rebuilding global"):
        convert_pickle(src, tmp_path / "out", allow_pickle=True)
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    src = torch_zip(tmp_path, pickle.dumps(RunsShell(), protocol=protocol), name="b.pt")
    with pytest.raises(CheckpointError, match="posix.system|os.system|nt.system"):
        convert_pickle(src, tmp_path / "out", allow_pickle=True)


def test_stack_global_with_computed_operands_refused():
    # STACK_GLOBAL whose operands are not two plain string pushes (here: an int and a string)
    payload = b"\x80\x04K\x01\x8c\x04evil\x93."
    with pytest.raises(CheckpointError, match="STACK_GLOBAL"):
        scan_pickle(payload, "x")


def test_extension_registry_and_garbage_refused():
    with pytest.raises(CheckpointError, match="extension registry"):
        scan_pickle(b"\x80\x02\x82\x01.", "x")
    with pytest.raises(CheckpointError, match="malformed"):
        scan_pickle(b"\x80\x02\xff\xff", "x")


def test_raw_pickle_and_zip_slip_refused(tmp_path):
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        convert_pickle(raw, tmp_path / "out", allow_pickle=True)
    slip = torch_zip(tmp_path, pickle.dumps({}), name="slip.pt", member="../../evil/data.pkl")
    with pytest.raises(CheckpointError, match="escapes the archive"):
        convert_pickle(slip, tmp_path / "out", allow_pickle=True)


def test_non_tensor_content_refused(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"lr": 0.1, "name": "x"}, src)
    with pytest.raises(CheckpointError, match="state dict of named tensors"):
        convert_pickle(src, tmp_path / "out", allow_pickle=True)


def test_output_folder_must_be_new(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(1)}, src)
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_pickle(src, tmp_path / "out", allow_pickle=True)
