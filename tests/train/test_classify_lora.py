"""train.objective classify | regress with finetune.lora.enabled: adapters on the projections and
the score head trained whole beside them; what checkpoints and the adapter folder hold, exact
resume, inference on the run's checkpoint equal to the merged classifier's, eval / predict on
both, the HF export of the merged model, and the refusals (another base, PEFT export, merging
the adapter folder)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import finetune_config, make_base_checkpoint
from typer.testing import CliRunner

from bastion.adapters.folder import read_adapter
from bastion.adapters.merge import merge_checkpoint
from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import checkpoint_config
from bastion.cli import app
from bastion.config.schema import LoraConfig
from bastion.data.labelled import label_spec, load_labelled
from bastion.errors import CheckpointError
from bastion.eval.classify import eval_labels, predict_labels
from bastion.infer.loading import load_for_inference
from bastion.model import Transformer
from bastion.model.heads import sequence_scores
from bastion.model.lora import apply_lora
from bastion.train.loop import train
from synthetic.labelled import write_labelled_splits

LABELS = ["neg", "neu", "pos"]
LORA = {"rank": 4, "alpha": 8.0}
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify-lora")
    base = make_base_checkpoint(root / "base")
    write_labelled_splits(root)
    out = {"root": root, "base": base}
    out["classify"] = train(_config(out, "classify", root / "run-c", max_steps=60), quiet=True)
    out["merged"] = merge_checkpoint(base, out["classify"].run_dir, root / "merged")
    return out


def _config(runs, objective, out_dir, *, base=None, **settings):
    root = runs["root"]
    data = "c" if objective == "classify" else "r"
    sequence = {"labels": LABELS} if objective == "classify" else {"label_range": [-3, 3]}
    settings = {"seq_len": 64, "batch_size": 16, "lr": 1e-2, "eval_every": 1000, "eval_batches": 8, **settings}
    return finetune_config(base or runs["base"], root / f"{data}.jsonl", out_dir, objective=objective,
                           val_file=root / f"{data}v.jsonl", sequence=sequence, lora=LORA, **settings)


def _val_batch(loaded, root):
    cfg = loaded.config.finetune
    data = load_labelled(root / "cv.jsonl", loaded.tokenizer, label_spec("classify", cfg.sequence), cfg, ["/"])
    return data.collate([[i] for i in range(16)], 64)["input_ids"], data.pad_id


# ---- training ------------------------------------------------------------------------------


def test_lora_classifier_learns_the_marker_words(runs):
    result = runs["classify"]
    assert result.losses[0] == pytest.approx(math.log(3), abs=1e-5)  # zero head: uniform over 3 classes
    assert result.val_metrics["accuracy"] >= 0.9, result.val_metrics
    assert result.val_metrics["macro_f1"] >= 0.9


# A second LoRA run of 120 steps: regress with LoRA is ClassifyTask's regress path (learned in
# test_classify_objective.py) under the adapters learned above; in `make test-all`.
@pytest.mark.slow
def test_lora_regressor_learns_the_marker_values(runs, tmp_path):
    metrics = train(_config(runs, "regress", tmp_path / "r", max_steps=120), quiet=True).val_metrics
    assert metrics["mae"] <= 0.8 and metrics["pearson"] >= 0.85, metrics


def test_only_adapters_and_the_score_head_train(runs):
    ckpt = load_checkpoint(runs["classify"].checkpoint, load_optimizer=False)
    config = checkpoint_config(ckpt)
    model = Transformer(config.model)
    apply_lora(model, LoraConfig(enabled=True, **LORA))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(ckpt.model)  # the checkpoint holds exactly what trained
    assert "score.weight" in trainable and "output.weight" not in ckpt.model
    # 2 layers x (wq wk wv wo: rank 4 x (64 + out) each) + the 3 x 64 head
    d, kv = 64, 2 * 64 // 4
    per_layer = 4 * ((d + d) + (d + kv) + (d + kv) + (d + d))
    assert sum(trainable.values()) == 2 * per_layer + 3 * 64 == 3776
    assert sum(trainable.values()) < model.num_params() / 20


def test_adapter_folder_carries_the_head(runs):
    adapter = read_adapter(runs["classify"].adapter)
    ckpt = load_checkpoint(runs["classify"].checkpoint, load_optimizer=False)
    assert adapter.head is not None and adapter.head.score_labels == 3
    assert adapter.head.objective == "classify" and adapter.head.sequence.labels == LABELS
    assert set(adapter.tensors) == set(ckpt.model)
    assert torch.equal(adapter.tensors["score.weight"], ckpt.model["score.weight"])


def test_lora_classify_resume_is_exact(runs, tmp_path):
    kwargs = dict(max_steps=8, batch_size=4, log_every=1, eval_every=4, eval_batches=2)
    straight = train(_config(runs, "classify", tmp_path / "a", **kwargs), quiet=True)
    first = train(_config(runs, "classify", tmp_path / "b", **kwargs), quiet=True, should_stop=lambda step: step == 3)
    second = train(_config(runs, "classify", tmp_path / "b", **kwargs), resume=True, quiet=True)
    assert first.steps == 3
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second.val_metrics == pytest.approx(straight.val_metrics, abs=1e-6)
    a = load_checkpoint(straight.checkpoint, load_optimizer=False).model
    b = load_checkpoint(second.checkpoint, load_optimizer=False).model
    assert "score.weight" in a and set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ---- inference: the run's checkpoint and the merged classifier -------------------------------


def test_merged_and_unmerged_score_alike(runs):
    unmerged = load_for_inference(runs["classify"].checkpoint, head="score")
    merged = load_for_inference(runs["merged"], head="score")
    assert merged.config.model.score_labels == 3 and not merged.config.finetune.lora.enabled
    assert "output.weight" not in load_checkpoint(runs["merged"], load_optimizer=False).model
    ids, pad_id = _val_batch(unmerged, runs["root"])
    with torch.no_grad():
        a = sequence_scores(unmerged.model, ids, pad_id)
        b = sequence_scores(merged.model, ids, pad_id)
    assert (a - b).abs().max().item() <= 1e-5
    with torch.no_grad():  # the model as it trained: adapters beside the base weights, not folded in
        c = sequence_scores(_unmerged_model(runs), ids, pad_id)
    assert (c - b).abs().max().item() <= 1e-5
    on_run = eval_labels(runs["classify"].checkpoint, runs["root"] / "cv.jsonl", roots=["/"])
    on_merged = eval_labels(runs["merged"], runs["root"] / "cv.jsonl", roots=["/"])
    assert on_run["accuracy"] == pytest.approx(runs["classify"].val_metrics["accuracy"], abs=1e-6)
    for name in ("loss", "accuracy", "macro_f1"):
        assert on_merged[name] == pytest.approx(on_run[name], abs=1e-5)


def _unmerged_model(runs) -> Transformer:
    from bastion.adapters.folder import load_lora_state_dict
    from bastion.model.heads import base_weights_for

    base = load_checkpoint(runs["base"], load_optimizer=False)
    ckpt = load_checkpoint(runs["classify"].checkpoint, load_optimizer=False)
    config = checkpoint_config(ckpt)
    weights = base_weights_for(base.model, checkpoint_config(base).model, config.model.score_labels)
    model = Transformer.from_state_dict(config.model, weights).float().eval()
    apply_lora(model, config.finetune.lora)
    load_lora_state_dict(model, ckpt.model)
    return model


@pytest.mark.parametrize("which", ["run", "merged"])
def test_cli_eval_classify_and_predict(runs, tmp_path, which):
    ckpt = str(runs["classify"].checkpoint if which == "run" else runs["merged"])
    result = runner.invoke(app, ["eval", "classify", "--checkpoint", ckpt, "--data", str(runs["root"] / "cv.jsonl"),
                                 "--root", "/", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] >= 0.9
    result = runner.invoke(app, ["predict", "--checkpoint", ckpt, "--text", "awful ka", "--text", "lovely lo"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == ["neg", "pos"]
    preds = list(predict_labels(ckpt, texts=["ne plain ru"]))
    assert preds[0]["label"] == "neu"


def test_merged_classifier_exports_with_equal_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from bastion.interop import export_hf

    out = export_hf(runs["merged"], tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    unmerged = load_for_inference(runs["classify"].checkpoint, head="score")
    ids, pad_id = _val_batch(unmerged, runs["root"])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != pad_id).long()).logits
        mine = sequence_scores(unmerged.model, ids, pad_id)
    assert (theirs - mine).abs().max().item() <= 1e-5
    assert [hf.config.id2label[i] for i in theirs.argmax(-1).tolist()] == [LABELS[i] for i in mine.argmax(-1).tolist()]


# ---- refusals ------------------------------------------------------------------------------


def test_another_base_is_refused(runs, tmp_path):
    other = make_base_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="refusing to apply it to a different base"):
        merge_checkpoint(other, runs["classify"].adapter, tmp_path / "m1")
    with pytest.raises(CheckpointError, match="different base"):
        merge_checkpoint(other, runs["classify"].run_dir, tmp_path / "m2")
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_adapter_folder_merge_and_peft_export_are_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="merge that run's checkpoint instead"):
        merge_checkpoint(runs["base"], runs["classify"].adapter, tmp_path / "m")
    from bastion.interop.peft import export_peft

    with pytest.raises(CheckpointError, match="PEFT export does not carry"):
        export_peft(runs["classify"].adapter, tmp_path / "peft")
    assert not (tmp_path / "m").exists() and not (tmp_path / "peft").exists()


def test_serving_a_scoring_adapter_is_refused(runs):
    from bastion.adapters.serving import _check_fit

    adapter = read_adapter(runs["classify"].adapter)
    with pytest.raises(CheckpointError, match="carries a score head"):
        _check_fit("cls", adapter, Transformer(checkpoint_config(load_checkpoint(runs["base"])).model))
