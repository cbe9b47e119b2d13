"""LoRA adapters as files: adapter folders are verified and bound to their base checkpoint,
loading is strict, merged checkpoints are ordinary checkpoints."""
import json
import stat

import pytest
import torch
import yaml

from bastion.adapters import load_adapter, load_lora_state_dict, merge_checkpoint, save_adapter
from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.checkpoint.contents import BASE_SHA_KEY, manifest_sha256
from bastion.config import build_config, to_yaml
from bastion.config.schema import LoraConfig
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.model.lora import apply_lora, lora_state_dict
from helpers import LORA_TARGETS, lora_test_config, lora_test_ids, lora_test_model, randomize_adapters

def save_base(root, seed=0, **model):
    config = lora_test_config(**model)
    torch.manual_seed(seed)
    net = Transformer(config.model)
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 5, "special_tokens": {"eos_token": "<e>"}},
                      config_yaml=to_yaml(config), tokenizer_json="{}")
    return save_checkpoint(root, 5, ckpt), net


def test_load_lora_state_dict_is_strict():
    model = lora_test_model()
    apply_lora(model, LoraConfig(enabled=True, rank=4))
    good = {k: v.clone() for k, v in lora_state_dict(model).items()}
    for bad in (
        {k: v for k, v in good.items() if k != "layers.1.attention.wq.lora_A"},       # missing
        {**good, "layers.0.attention.wz.lora_A": torch.zeros(4, 32)},               # unexpected
        {**good, "layers.0.attention.wq.lora_A": torch.zeros(5, 32)},               # shape
        {**good, "layers.0.attention.wq.lora_B": torch.full((32, 4), float("nan"))},  # NaN
    ):
        with pytest.raises(CheckpointError):
            load_lora_state_dict(model, bad)
    load_lora_state_dict(model, good)


def test_adapter_round_trip_and_base_binding(tmp_path):
    base_dir, base = save_base(tmp_path / "base")
    sha = manifest_sha256(base_dir)
    assert sha == manifest_sha256(tmp_path / "base")  # a root with `latest` resolves too
    cfg = LoraConfig(enabled=True, rank=4, alpha=8, dropout=0.05, target_modules=["wq", "wo", "w3"])
    apply_lora(base, cfg)
    randomize_adapters(base)
    out = save_adapter(base, cfg, tmp_path / "adapter", sha)
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "adapter.safetensors", "adapter_config.json"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["base_manifest_sha256"] == sha and meta["rank"] == 4 and meta["target_modules"] == ["wq", "wo", "w3"]

    fresh = lora_test_model().eval()  # same seed: the base weights
    loaded_cfg = load_adapter(fresh, out, sha)
    assert loaded_cfg.target_modules == cfg.target_modules and loaded_cfg.dropout == 0.05
    base.eval()
    torch.testing.assert_close(fresh(lora_test_ids())[0], base(lora_test_ids())[0], rtol=0, atol=0)
    # re-saving over an adapter folder replaces it; over anything else is refused
    save_adapter(base, cfg, out, sha)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        save_adapter(base, cfg, tmp_path / "other", sha)

    # wrong base refused
    other_dir, _ = save_base(tmp_path / "other_base", seed=1)
    with pytest.raises(CheckpointError, match="different base"):
        load_adapter(lora_test_model(seed=1), out, manifest_sha256(other_dir))
    # config mismatching an already-wrapped model refused
    wrapped = lora_test_model()
    apply_lora(wrapped, LoraConfig(rank=2, target_modules=["wq", "wo", "w3"]))
    with pytest.raises(CheckpointError, match="differ"):
        load_adapter(wrapped, out, sha)
    # tampering refused
    data = bytearray((out / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_adapter(lora_test_model(), out, sha)
    (out / "extra.json").write_text("{}")
    with pytest.raises(CheckpointError, match="extra file"):
        load_adapter(lora_test_model(), out, sha)


def test_merge_checkpoint_from_adapter_folder_and_training_checkpoint(tmp_path):
    base_dir, base = save_base(tmp_path / "base", qkv_bias=True)
    sha = manifest_sha256(base_dir)
    cfg = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=LORA_TARGETS)
    apply_lora(base, cfg)
    randomize_adapters(base)
    base.eval()
    with torch.no_grad():
        expected = base(lora_test_ids())[0]
    adapter = save_adapter(base, cfg, tmp_path / "adapter", sha)

    merged_dir = merge_checkpoint(base_dir, adapter, tmp_path / "merged")
    ckpt = load_checkpoint(merged_dir)
    config = build_config(yaml.safe_load(ckpt.config_yaml))
    assert config.finetune.lora.enabled is False
    assert ckpt.trainer_state["merged_lora"]["base_manifest_sha256"] == sha
    assert ckpt.trainer_state["special_tokens"] == {"eos_token": "<e>"}
    plain = Transformer(config.model).eval()
    plain.load_state_dict(ckpt.model, strict=True)
    with torch.no_grad():
        assert (plain(lora_test_ids())[0] - expected).abs().max().item() <= 1e-5
    with pytest.raises(CheckpointError, match="not an empty folder"):
        merge_checkpoint(base_dir, adapter, tmp_path / "merged")

    # a LoRA training checkpoint: full state dict (base + adapters), base recorded in trainer_state
    run_config = lora_test_config(qkv_bias=True)
    run_config.finetune.lora = cfg
    run_config.train.objective = "sft"  # LoRA is a fine-tuning setting
    run_config.finetune.init_from, run_config.finetune.train_file = str(base_dir), "train.jsonl"
    run = Checkpoint(model=base.state_dict(), trainer_state={"step": 3, BASE_SHA_KEY: sha},
                     config_yaml=to_yaml(run_config), tokenizer_json="{}")
    run_dir = save_checkpoint(tmp_path / "run", 3, run)
    merged2 = load_checkpoint(merge_checkpoint(base_dir, tmp_path / "run", tmp_path / "merged2"))
    assert all(torch.equal(merged2.model[k], ckpt.model[k]) for k in ckpt.model)
    # adapter-only training checkpoint works too
    run.model = lora_state_dict(base)
    save_checkpoint(tmp_path / "run_lora_only", 3, run)
    merge_checkpoint(base_dir, tmp_path / "run_lora_only", tmp_path / "merged3")

    # wrong base refused, for both kinds of adapter source
    other_dir, _ = save_base(tmp_path / "other", seed=1, qkv_bias=True)
    with pytest.raises(CheckpointError, match="different base"):
        merge_checkpoint(other_dir, adapter, tmp_path / "m4")
    with pytest.raises(CheckpointError, match="different base"):
        merge_checkpoint(other_dir, run_dir, tmp_path / "m5")
    # a training checkpoint that does not record its base and carries no base weights: refused
    run.trainer_state = {"step": 3}
    save_checkpoint(tmp_path / "unrecorded", 3, run)
    with pytest.raises(CheckpointError, match="does not record"):
        merge_checkpoint(base_dir, tmp_path / "unrecorded", tmp_path / "m6")
