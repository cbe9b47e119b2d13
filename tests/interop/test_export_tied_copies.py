"""Exports of a tied model whose checkpoint stores the tie as a copy (the state was cast or
cloned tensor by tensor, so `output.weight` is an equal tensor, stored once under `copies`):
transformers ties lm_head to the embedding with the same logits; llama.cpp's GGUF gets one
token_embd and no output tensor, as for an aliased tie."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import exports
from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.interop import export_hf
from bastion.interop.gguf import export_gguf


def test_tied_checkpoint_with_a_copied_lm_head_exports(tmp_path):
    tokenizer = exports.bastion_tokenizer()
    ckpt_dir, net = exports.make_checkpoint(tmp_path / "run", tokenizer)
    original = load_checkpoint(ckpt_dir)
    cloned = {k: v.clone() for k, v in original.model.items()}  # unties: two equal tensors
    copied = save_checkpoint(tmp_path / "copied", 7, Checkpoint(
        model=cloned, trainer_state=original.trainer_state, config_yaml=original.config_yaml,
        tokenizer_json=original.tokenizer_json))
    raw = (copied / "model.safetensors").read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert json.loads(meta["copies"]) == {"output.weight": "tok_embeddings.weight"}

    out = export_hf(copied, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (net(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4

    reader = gguf.GGUFReader(export_gguf(copied, tmp_path / "model.gguf", dtype="f32"))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
