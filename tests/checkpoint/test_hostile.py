"""Hostile checkpoint files: each is refused with a clear error and nothing is executed,
even when the attacker also rewrites MANIFEST.json so that sizes and hashes match."""
import hashlib
import json
import os
import struct

import pytest
import torch

from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.checkpoint.safetensors_check import check_finite, parse_header
from bastion.errors import CheckpointError


def raw_safetensors(entries: dict, data: bytes, header_len: int | None = None) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header) if header_len is None else header_len) + header + data


def forge(ckpt_dir, name: str, data: bytes) -> None:
    """Replace a file AND fix its manifest entry: only structural checks can catch this."""
    path = ckpt_dir / name
    os.chmod(path, 0o600)
    path.write_bytes(data)
    manifest_path = ckpt_dir / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    os.chmod(manifest_path, 0o600)
    manifest_path.write_text(json.dumps(manifest))


F32_8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CASES = {
    "overlapping offsets": ({"a": F32_8, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
    "offset past the data": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 12, "outside"),
    "negative offset": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, "outside"),
    "size does not match shape": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    "trailing bytes": ({"a": F32_8}, 16, "trailing"),
    "hole between tensors": ({"a": F32_8, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, 20, "unaccounted"),
    "unknown dtype": ({"a": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    "bad shape": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
    "extra entry key": ({"a": {**F32_8, "exec": "os.system"}}, 8, "exactly dtype"),
    "non-string metadata": ({"__metadata__": {"x": 1}, "a": F32_8}, 8, "__metadata__"),
    # A zero dimension makes a tensor span no bytes whatever its other dimensions claim:
    "dimension past int64": ({"a": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, 0, "element limit"),
    "dimensions overflowing": ({"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0,
                               "element limit"),
    "rank over the limit": ({"a": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, 4, "invalid shape"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_headers_refused(case):
    entries, data_len, message = CASES[case]
    with pytest.raises(CheckpointError, match=message):
        parse_header(raw_safetensors(entries, b"\0" * data_len), "x.safetensors")


def test_huge_declared_header_refused_without_allocating():
    with pytest.raises(CheckpointError, match="over the"):
        parse_header(struct.pack("<Q", 2**40) + b"{}", "x")
    with pytest.raises(CheckpointError, match="file has"):
        parse_header(struct.pack("<Q", 1000) + b"{}", "x")


def test_duplicate_keys_and_garbage_refused():
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    with pytest.raises(CheckpointError, match="duplicate key 'a'"):
        parse_header(struct.pack("<Q", len(header)) + header + b"\0" * 8, "x")
    with pytest.raises(CheckpointError, match="header: not valid UTF-8"):
        parse_header(struct.pack("<Q", 4) + b"\xff\xfe{}" + b"", "x")
    with pytest.raises(CheckpointError, match="too short"):
        parse_header(b"abc", "x")


def make_checkpoint(tmp_path):
    model = {"w": torch.randn(4, 4), "b": torch.zeros(4)}
    return save_checkpoint(tmp_path / "ck", 1, Checkpoint(model=model, trainer_state={"step": 1},
                                                          config_yaml="a: 1\n", tokenizer_json="{}"))


@pytest.mark.parametrize("case", ["overlapping offsets", "offset past the data", "trailing bytes", "hole between tensors"])
def test_forged_weights_with_matching_manifest_refused(tmp_path, case):
    path = make_checkpoint(tmp_path)
    entries, data_len, message = CASES[case]
    forge(path, "model.safetensors", raw_safetensors(entries, b"\0" * data_len))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_wrong_shapes_and_dtypes_against_model(tmp_path):
    path = make_checkpoint(tmp_path)
    expect = {"w": torch.empty(4, 4), "b": torch.empty(4)}
    load_checkpoint(path, expect=expect)  # the honest checkpoint fits
    with pytest.raises(CheckpointError, match=r"w has shape \(4, 4\), the config implies \(8, 4\)"):
        load_checkpoint(path, expect={**expect, "w": torch.empty(8, 4)})
    with pytest.raises(CheckpointError, match="dtype"):
        load_checkpoint(path, expect={**expect, "b": torch.empty(4, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match="missing extra"):
        load_checkpoint(path, expect={**expect, "extra": torch.empty(1)})


def test_nonfinite_weights_refused_when_asked(tmp_path):
    model = {"w": torch.tensor([1.0, float("nan")])}
    path = save_checkpoint(tmp_path, 1, Checkpoint(model=model, trainer_state={}, config_yaml="", tokenizer_json="{}"))
    assert torch.isnan(load_checkpoint(path).model["w"][1])
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_checkpoint(path, reject_nonfinite=True)
    check_finite({"sum overflows": torch.full((4,), 60000.0, dtype=torch.float16)}, "x")  # finite, though its sum is not
    with pytest.raises(CheckpointError, match="'w' contains NaN or Inf"):
        check_finite({"w": torch.tensor([1.0, float("inf"), float("-inf")])}, "x")


def test_sharded_model_round_trip_and_forged_index(tmp_path):
    tied = torch.randn(64, 32)
    model = {"emb": tied, "out": tied, **{f"layer{i}": torch.randn(64, 64) for i in range(4)}}
    path = save_checkpoint(tmp_path / "ck", 3, Checkpoint(model=model, trainer_state={}, config_yaml="",
                                                          tokenizer_json="{}"), max_shard_bytes=40_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (path / "model.safetensors").exists()
    loaded = load_checkpoint(path).model
    assert all(torch.equal(loaded[k], model[k]) for k in model)
    assert loaded["out"].data_ptr() == loaded["emb"].data_ptr()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["layer0"] = "../../etc/passwd"
    forge(path, "model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(CheckpointError, match="invalid or unlisted shard"):
        load_checkpoint(path)


def test_tensor_moved_between_shards_refused(tmp_path):
    model = {f"layer{i}": torch.randn(64, 64) for i in range(4)}
    path = save_checkpoint(tmp_path / "ck", 3, Checkpoint(model=model, trainer_state={}, config_yaml="",
                                                          tokenizer_json="{}"), max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    weight_map["layer0"], weight_map["layer1"] = weight_map["layer1"], weight_map["layer0"]
    forge(path, "model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(CheckpointError, match="index places elsewhere"):
        load_checkpoint(path)


def test_header_is_checked_from_its_prefix_and_the_files_size():
    """What a streaming reader keeps (the length and the header) is enough to check the layout."""
    data = raw_safetensors({"a": F32_8}, b"\0" * 8)
    head = data[: len(data) - 8]
    assert parse_header(head, "x", size=len(data)) == parse_header(data, "x")
    with pytest.raises(CheckpointError, match="trailing"):
        parse_header(head, "x", size=len(data) + 1)


HUGE = raw_safetensors({"layers.0.attention.wq.lora_A": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, b"")


def assert_refused_in_one_line(argv):
    from typer.testing import CliRunner

    from bastion.cli import app

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (result.exception, result.output[-500:])
    assert len(result.output.strip().splitlines()) == 1 and "element limit" in result.output, result.output


def test_huge_dimensions_refused_by_import_hf(tmp_path):
    from helpers import make_base_checkpoint

    from bastion.interop.hf import export_hf

    hf_dir = export_hf(make_base_checkpoint(tmp_path / "base"), tmp_path / "hf")
    os.chmod(hf_dir / "model.safetensors", 0o600)
    (hf_dir / "model.safetensors").write_bytes(HUGE)
    assert_refused_in_one_line(["import", "hf", str(hf_dir), str(tmp_path / "imported")])
    assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("command", ["export peft", "merge"])
def test_huge_dimensions_refused_in_an_adapter(tmp_path, command):
    from helpers import lora_test_config

    from bastion.adapters import save_adapter
    from bastion.checkpoint.contents import manifest_sha256
    from bastion.config import to_yaml
    from bastion.config.schema import LoraConfig
    from bastion.model import Transformer
    from bastion.model.lora import apply_lora

    config = lora_test_config()
    model = Transformer(config.model)
    base = save_checkpoint(tmp_path / "base", 1, Checkpoint(model=model.state_dict(), trainer_state={"step": 1},
                                                            config_yaml=to_yaml(config), tokenizer_json="{}"))
    lora = LoraConfig(enabled=True, rank=2, target_modules=["wq"])
    apply_lora(model, lora)
    adapter = save_adapter(model, lora, tmp_path / "adapter", manifest_sha256(base))
    forge(adapter, "adapter.safetensors", HUGE)
    argv = {"export peft": ["export", "peft", str(adapter), str(tmp_path / "out")],
            "merge": ["merge", str(base), str(adapter), str(tmp_path / "out")]}[command]
    assert_refused_in_one_line(argv)
    assert not (tmp_path / "out").exists()
