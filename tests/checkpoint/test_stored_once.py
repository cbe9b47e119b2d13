"""Tensors stored once: tied weights (shared storage) and bit-identical copies (a tied model
cast tensor by tensor), restored on load; hostile alias / copy metadata refused."""
import hashlib
import json

import pytest
import safetensors.torch
import torch

from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.config import build_config
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.checkpoint.manifest import MANIFEST


def forge(ckpt_dir, name, data):
    """Replace a file and its manifest entry: only the format checks can refuse it."""
    (ckpt_dir / name).chmod(0o600)
    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / MANIFEST).chmod(0o600)
    (ckpt_dir / MANIFEST).write_text(json.dumps(manifest))


def header(path):
    raw = path.read_bytes()
    return json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])


def tied_model():
    cfg = build_config({"model": {"preset": "tiny", "vocab_size": 512, "n_layer": 1}, "train": {"seq_len": 64}})
    torch.manual_seed(0)
    return cfg.model, Transformer(cfg.model)


def save(root, model, **kw):
    return save_checkpoint(root, 1, Checkpoint(model=model, trainer_state={}, config_yaml="", tokenizer_json="{}"), **kw)


def test_tied_model_cast_to_bf16_stores_the_tie_once_and_loads_identically(tmp_path):
    cfg, model = tied_model()
    cast = {k: v.bfloat16() for k, v in model.state_dict().items()}  # .bfloat16() unties: two equal tensors
    assert cast["output.weight"].data_ptr() != cast["tok_embeddings.weight"].data_ptr()
    path = save(tmp_path, cast)
    stored = header(path / "model.safetensors")
    assert "output.weight" not in stored
    assert json.loads(stored["__metadata__"]["copies"]) == {"output.weight": "tok_embeddings.weight"}
    embedding_bytes = cast["tok_embeddings.weight"].numel() * 2
    both = sum(t.numel() * t.element_size() for t in cast.values())
    assert (path / "model.safetensors").stat().st_size < both - embedding_bytes + 4096

    loaded = load_checkpoint(path).model
    assert set(loaded) == set(cast)
    for name, tensor in cast.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # a copy loads as its own tensor: equal tensors that were never tied do not become tied
    assert loaded["output.weight"].data_ptr() != loaded["tok_embeddings.weight"].data_ptr()
    rebuilt = Transformer.from_state_dict(cfg, {k: v.float() for k, v in loaded.items()})
    assert rebuilt.output.weight is rebuilt.tok_embeddings.weight  # the tie restored in the model


def test_shared_storage_loads_as_one_tensor_and_shards_keep_both_kinds(tmp_path):
    _, model = tied_model()
    state = model.state_dict()
    state["extra.copy"] = state["layers.0.attention.wq.weight"].clone()
    path = save(tmp_path, state, max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["aliases"] == {"output.weight": "tok_embeddings.weight"}
    assert index["copies"] == {"extra.copy": "layers.0.attention.wq.weight"}
    assert "output.weight" not in index["weight_map"] and "extra.copy" not in index["weight_map"]
    loaded = load_checkpoint(path).model
    assert loaded["output.weight"] is loaded["tok_embeddings.weight"]
    assert torch.equal(loaded["extra.copy"], state["extra.copy"])
    assert loaded["extra.copy"].data_ptr() != loaded["layers.0.attention.wq.weight"].data_ptr()


def test_equal_bits_only(tmp_path):
    """-0.0 == 0.0 and NaN != NaN as numbers; stored once means the same bits."""
    zeros = torch.zeros(2048)
    model = {"a": zeros, "b": -zeros, "c": zeros.clone(), "n": torch.full((2048,), float("nan")),
             "m": torch.full((2048,), float("nan"))}
    path = save(tmp_path, model)
    assert json.loads(header(path / "model.safetensors")["__metadata__"]["copies"]) == {"c": "a", "m": "n"}
    loaded = load_checkpoint(path).model
    assert torch.equal(loaded["b"].view(torch.int32), (-zeros).view(torch.int32))


def test_older_checkpoint_with_the_tie_stored_twice_still_loads(tmp_path):
    cfg, model = tied_model()
    path = save(tmp_path, {"placeholder": torch.zeros(1)})
    both = {k: v.clone() for k, v in model.state_dict().items()}
    forge(path, "model.safetensors", safetensors.torch.save(both))
    loaded = load_checkpoint(path).model
    assert torch.equal(loaded["output.weight"], loaded["tok_embeddings.weight"])
    Transformer.from_state_dict(cfg, loaded)


def test_tied_config_refuses_a_different_lm_head(tmp_path):
    cfg, model = tied_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["output.weight"] += 1
    with pytest.raises(CheckpointError, match="ties embeddings, but output.weight differs"):
        Transformer.from_state_dict(cfg, state)


@pytest.mark.parametrize("key,value,message", [
    ("aliases", '{"x": "missing"}', "not a tensor stored"),
    ("aliases", '{"w": "b"}', "already stored"),
    ("copies", '{"x": ["w"]}', "not a tensor stored"),
    ("copies", '["w"]', "malformed 'copies'"),
    ("aliases", '{"x": "w", "y": "w", "z": "w"}', "malformed 'aliases'"),
    ("aliases", "not json", "'aliases' metadata is not JSON"),
])
def test_hostile_alias_metadata_refused(tmp_path, key, value, message):
    path = save(tmp_path, {"placeholder": torch.zeros(1)})
    forge(path, "model.safetensors", safetensors.torch.save({"w": torch.ones(3), "b": torch.zeros(3)}, metadata={key: value}))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_reserved_metadata_keys_refused_on_save(tmp_path):
    ckpt = Checkpoint(model={"w": torch.ones(2)}, trainer_state={}, config_yaml="", tokenizer_json="{}",
                      optimizer={"s": torch.ones(2)}, optimizer_meta={"copies": "{}"})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path, 1, ckpt)
    assert not list(tmp_path.glob("step_*"))
