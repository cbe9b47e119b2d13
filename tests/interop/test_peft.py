"""`export_peft`: a Bastion LoRA adapter loads offline with peft.PeftModel on top of the
`export_hf` base, and gives the logits our base + adapter gives."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import safetensors.torch

from bastion.checkpoint import Checkpoint, save_checkpoint
from bastion.config import build_config, to_yaml
from bastion.config.schema import LoraConfig
from bastion.errors import CheckpointError
from bastion.interop import export_hf
from bastion.interop.peft import export_peft
from bastion.model import Transformer
from bastion.adapters import save_adapter
from bastion.checkpoint.contents import manifest_sha256
from bastion.model.lora import apply_lora, lora_state_dict
from bastion.tokenizer import BastionTokenizer

# transformers' own deprecation notice, raised inside PeftModel.from_pretrained
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello bastion"] * 20
CASES = {
    "attention-tied": ({}, ["wq", "wk", "wv", "wo"]),
    "all-bias-untied": ({"qkv_bias": True, "tie_embeddings": False}, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
}


@pytest.fixture(scope="module")
def tokenizer():
    return BastionTokenizer.train(TEXT, vocab_size=280)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_adapter_with_equal_logits(tmp_path, tokenizer, case):
    settings, targets = CASES[case]
    torch.manual_seed(0)
    config = build_config({"model": {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                                      "d_model": 64, "d_ff": 96, "max_seq_len": 64, **settings},
                           "train": {"seq_len": 64}})
    model = Transformer(config.model)
    base_dir = save_checkpoint(tmp_path / "base", 1, Checkpoint(
        model=model.state_dict(), trainer_state={"step": 1}, config_yaml=to_yaml(config),
        tokenizer_json=tokenizer.to_json_str()))
    hf_dir = export_hf(base_dir, tmp_path / "hf")

    cfg = LoraConfig(enabled=True, rank=4, alpha=12, dropout=0.1, target_modules=targets)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    adapter_dir = save_adapter(model, cfg, tmp_path / "adapter", manifest_sha256(base_dir))
    peft_dir = export_peft(adapter_dir, tmp_path / "peft", base_model_name_or_path=str(hf_dir))

    pc = json.loads((peft_dir / "adapter_config.json").read_text())
    hf_targets = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
                  "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    assert pc["peft_type"] == "LORA" and pc["task_type"] == "CAUSAL_LM" and pc["bias"] == "none"
    assert pc["r"] == 4 and pc["lora_alpha"] == 12 and pc["lora_dropout"] == 0.1
    assert sorted(pc["target_modules"]) == sorted(hf_targets[t] for t in targets)
    keys = safetensors.torch.load_file(peft_dir / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * len(targets)

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    peft_model = peft.PeftModel.from_pretrained(hf, peft_dir, local_files_only=True).eval()
    model.eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)[0]
        theirs = peft_model(input_ids=ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        # the adapter is really applied (not a silently ignored key mismatch)
        with peft_model.disable_adapter():
            assert (peft_model(input_ids=ids).logits - ours).abs().max().item() > 1e-3

    with pytest.raises(CheckpointError, match="not an empty folder"):
        export_peft(adapter_dir, peft_dir)


def test_export_refuses_tampered_adapter(tmp_path):
    torch.manual_seed(0)
    config = build_config({"model": {"vocab_size": 64, "n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32,
                                      "max_seq_len": 16}, "train": {"seq_len": 16}})
    model = Transformer(config.model)
    cfg = LoraConfig(enabled=True, rank=2)
    apply_lora(model, cfg)
    adapter_dir = save_adapter(model, cfg, tmp_path / "adapter", "0" * 64)
    meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    meta["rank"] = 3
    (adapter_dir / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        export_peft(adapter_dir, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
