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


# ---------------------------------------------------------------- the bytes torch.load reads
import io  # noqa: E402

from synthetic.pickles import build_corpus, call, legacy_with, torch_bytes, zip_with  # noqa: E402


@pytest.fixture
def torch_load_calls(monkeypatch):
    """torch.load's calls during a test: a refused file must never reach it."""
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _shell(sentinel) -> bytes:
    return call("os", "system", (f"touch {sentinel}",))


def _benign_pkl() -> bytes:
    return zipfile.ZipFile(io.BytesIO(torch_bytes({"w": torch.ones(2)}))).read("archive/data.pkl")


def _archive_variants(sentinel):
    benign = torch_bytes({"w": torch.ones(2)})
    others = [(i.filename, zipfile.ZipFile(io.BytesIO(benign)).read(i))
              for i in zipfile.ZipFile(io.BytesIO(benign)).infolist() if not i.filename.endswith("data.pkl")]
    return {
        "polyglot: raw pickle + torch zip": (_shell(sentinel) + benign, "does not start with a zip header"),
        "polyglot: legacy torch.save + torch zip": (legacy_with(_shell(sentinel)) + benign, "does not start with a zip header"),
        "zip with a prefix": (b"\0" * 40 + benign, "does not start with a zip header"),
        "legacy torch.save": (torch_bytes({"w": torch.ones(2)}, _use_new_zipfile_serialization=False),
                              "does not start with a zip header"),
        "zip with trailing bytes": (benign + _shell(sentinel), "does not end at its end record"),
        "zip comment": (benign[:-2] + b"\x03\x00abc", "does not end at its end record"),
        "bytes between members": (_gap_between_members(benign), "outside any archive member"),
        "two data.pkl": (zip_with([("archive/data.pkl", _benign_pkl()), ("archive/data.pkl", _shell(sentinel))] + others),
                         "same name"),
        "data.pkl spelled twice": (zip_with([("archive/data.pkl", _benign_pkl()), ("archive/DATA.PKL", _shell(sentinel))]
                                            + others), "same name"),
        "member outside the folder": (zip_with([("archive/data.pkl", _benign_pkl()), ("other/x", b"1")] + others),
                                      "outside the folder"),
        "compressed member": (zip_with(_benign_pkl(), zipfile.ZIP_DEFLATED), "compressed or encrypted"),
        "second pickle after STOP": (zip_with(_benign_pkl() + _shell(sentinel)), "after the pickle's end"),
    }


def _gap_between_members(archive: bytes) -> bytes:
    """`archive` rewritten by zipfile with 16 stray bytes before its second member."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for i, info in enumerate(src.infolist()):
            if i == 1:
                dst.fp.write(b"\0" * 16)  # offsets recorded after this point include the gap
                dst.start_dir = dst.fp.tell()
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("variant", list(_archive_variants("x")))
def test_archive_must_be_exactly_what_torch_load_reads(tmp_path, variant, torch_load_calls):
    sentinel = tmp_path / "sentinel"
    data, message = _archive_variants(sentinel)[variant]
    src = tmp_path / "model.pt"
    src.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        convert_pickle(src, tmp_path / "out", allow_pickle=True)
    assert not torch_load_calls and not sentinel.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload,message", [
    (b"\x80\x02ctorch\nFloatStorage\nJ\x00\x00\x00\x40\x85R.", "calls torch.FloatStorage"),  # a 4 GiB allocation
    (b"\x80\x02ccollections\nOrderedDict\n)R)R.", "computed object"),  # calling a call's result
    (b"\x80\x02ccollections\nOrderedDict\n}b.", "BUILD changes collections.OrderedDict"),
    (b"\x80\x02h\x05.", "memo entry 5 not set"),
    (b"\x80\x02(ctorch\nFloatStorage\no.", "calls torch.FloatStorage"),  # OBJ
])
def test_scan_follows_the_stack(payload, message):
    with pytest.raises(CheckpointError, match=message):
        scan_pickle(payload, "x")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickles")
    return root, build_corpus(root)


def test_corpus_hostile_refused_benign_converted(corpus, tmp_path, torch_load_calls):
    """Every hostile file of tests/synthetic/pickles.py (calls by GLOBAL / STACK_GLOBAL /
    memo / computed names, INST / OBJ, nested pickles, protocols 0-5, raw / legacy / zip /
    polyglot containers, duplicate members) is refused before torch.load and no payload
    runs; every benign state dict converts."""
    root, cases = corpus
    hostile = [c for c in cases if c.kind in ("hostile", "inert")]
    for case in hostile:
        with pytest.raises(CheckpointError):
            convert_pickle(case.path(root), tmp_path / case.name, allow_pickle=True)
    assert len(hostile) > 140 and not torch_load_calls
    assert not list((root / "sentinels").iterdir()) and not list(tmp_path.iterdir())
    weights = [c for c in cases if c.kind == "weights"]
    for case in weights:
        verify_checkpoint(convert_pickle(case.path(root), tmp_path / case.name, allow_pickle=True))
    assert len(weights) >= 25
