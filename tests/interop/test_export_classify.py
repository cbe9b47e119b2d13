"""`bastion export hf` of classify / regress checkpoints: transformers loads
`LlamaForSequenceClassification` with the class names, problem_type and pad token, and its
logits on a right-padded batch equal Bastion's in float32."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bastion.interop import export_hf
from bastion.model.heads import sequence_scores
from exports import bastion_tokenizer, make_checkpoint

LABELS = ["neg", "neu", "pos"]


def _sections(objective, sequence):
    return {"train": {"seq_len": 64, "objective": objective},
            "finetune": {"init_from": "base", "train_file": "train.jsonl", "sequence": sequence}}


CASES = {
    "classify": (3, _sections("classify", {"labels": LABELS}), "single_label_classification"),
    "regress": (1, _sections("regress", {"label_range": [-3, 3]}), "regression"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_logits_equal_bastion_scores(tmp_path, case):
    size, sections, problem_type = CASES[case]
    tokenizer = bastion_tokenizer()
    ckpt, ours = make_checkpoint(tmp_path / "run", tokenizer, score_labels=size, sections=sections)
    with torch.no_grad():  # a trained head is not zero: give it values
        ours.score.weight.copy_(torch.randn(size, 64, generator=torch.Generator().manual_seed(1)))
    from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    saved = load_checkpoint(ckpt, load_optimizer=False)
    ckpt = save_checkpoint(tmp_path / "run2", 7, Checkpoint(model=ours.state_dict(), trainer_state=saved.trainer_state,
                                                            config_yaml=saved.config_yaml,
                                                            tokenizer_json=saved.tokenizer_json))
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["problem_type"] == problem_type
    assert config["pad_token_id"] == tokenizer.pad_id
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.num_labels == size and hf.config.problem_type == problem_type
    if case == "classify":
        assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.label2id == {n: i for i, n in enumerate(LABELS)}

    lengths = [40, 17, 29, 3]
    g = torch.Generator().manual_seed(3)
    ids = torch.full((len(lengths), max(lengths)), tokenizer.pad_id)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, tokenizer.vocab_size, (n,), generator=g)
        tokens[tokens == tokenizer.pad_id] = tokenizer.eos_id
        ids[row, :n] = tokens
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != tokenizer.pad_id).long()).logits
        mine = sequence_scores(ours, ids, tokenizer.pad_id)
    assert theirs.shape == mine.shape == (4, size) and mine.abs().max().item() > 0.1
    assert (theirs - mine).abs().max().item() <= 1e-5
    print(f"max |delta logit| {case}: {(theirs - mine).abs().max().item():.2e}")
