"""`bastion export hf` of a reward model (model.score_labels): transformers'
`...ForSequenceClassification` scores a padded batch exactly as Bastion does; GGUF refuses it."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bastion.errors import CheckpointError
from bastion.interop import export_hf
from bastion.interop.gguf import export_gguf
from bastion.model.heads import sequence_scores
from exports import bastion_tokenizer, make_checkpoint

CASES = {
    "llama": ({}, "LlamaForSequenceClassification"),
    "llama-untied-bias": ({"qkv_bias": True, "tie_embeddings": False}, "LlamaForSequenceClassification"),
    "mistral-window": ({"sliding_window": 6}, "MistralForSequenceClassification"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return bastion_tokenizer()


def _padded_batch(tokenizer, lengths, seed=3):
    """Right-padded random sequences (no pad id inside a sequence) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_id)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, tokenizer.vocab_size, (n,), generator=g)
        tokens[tokens == tokenizer.pad_id] = tokenizer.eos_id
        ids[row, :n] = tokens
    return ids, (ids != tokenizer.pad_id).long()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_scores_equal_bastion_on_a_padded_batch(tmp_path, tokenizer, case):
    settings, architecture = CASES[case]
    ckpt, ours = make_checkpoint(tmp_path / "run", tokenizer, score_labels=1, **settings)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["pad_token_id"] == tokenizer.pad_id
    assert not (out / "generation_config.json").exists()

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == architecture and hf.config.num_labels == 1
    ids, mask = _padded_batch(tokenizer, [40, 17, 29, 3])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = sequence_scores(ours, ids, tokenizer.pad_id)
    assert theirs.shape == mine.shape == (4, 1)
    assert (theirs - mine).abs().max().item() <= 1e-5
    # Padding changes nothing: each row alone scores the same.
    for row, n in enumerate([40, 17, 29, 3]):
        alone = sequence_scores(ours, ids[row:row + 1, :n], tokenizer.pad_id)
        assert (alone - mine[row]).abs().max().item() <= 1e-5


def test_gguf_refuses_a_reward_model(tmp_path, tokenizer):
    ckpt, _ = make_checkpoint(tmp_path / "run", tokenizer, score_labels=1)
    with pytest.raises(CheckpointError, match="cannot generate"):
        export_gguf(ckpt, tmp_path / "rm.gguf")
    assert not (tmp_path / "rm.gguf").exists()
