"""train.objective classify | regress: a tiny language model with a score head learns separable
synthetic labelled texts; its metrics, checkpoints, exact resume, `bastion eval classify`,
`bastion predict`, the HF export, and every refusal of bad data or config."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import finetune_config, make_base_checkpoint
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import checkpoint_config
from bastion.cli import app
from bastion.config import build_config
from bastion.data.labelled import LabelSpec, load_labelled
from bastion.errors import CheckpointError, ConfigError, DataError
from bastion.eval.classify import eval_labels, predict_labels
from bastion.train.label_metrics import classification_metrics, macro_f1, regression_metrics
from bastion.train.loop import train
from synthetic.chat import write_jsonl
from synthetic.labelled import write_labelled_splits

LABELS = ["neg", "neu", "pos"]
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    base = make_base_checkpoint(root / "base")
    write_labelled_splits(root)
    out = {"root": root, "base": base}
    out["classify"] = train(_config(out, "classify", root / "run-c", max_steps=50), quiet=True)
    out["regress"] = train(_config(out, "regress", root / "run-r", max_steps=80), quiet=True)
    return out


def _config(runs, objective, out_dir, *, sequence=None, **settings):
    root = runs["root"]
    data = "c" if objective == "classify" else "r"
    if sequence is None:
        sequence = {"labels": LABELS} if objective == "classify" else {"label_range": [-3, 3]}
    settings = {"seq_len": 64, "batch_size": 16, "lr": 3e-3, "eval_every": 1000, "eval_batches": 8, **settings}
    return finetune_config(runs["base"], root / f"{data}.jsonl", out_dir, objective=objective,
                           val_file=root / f"{data}v.jsonl", sequence=sequence, **settings)


# ---- learning ------------------------------------------------------------------------------


def test_classifier_learns_the_marker_words(runs):
    result = runs["classify"]
    assert result.losses[0] == pytest.approx(math.log(3), abs=1e-5)  # zero head: uniform over 3 classes
    assert result.val_metrics["accuracy"] >= 0.9, result.val_metrics
    assert result.val_metrics["macro_f1"] >= 0.9
    assert result.val_metrics["examples"] == 60
    assert "macro-F1" in result.val_summary


def test_regressor_learns_the_marker_values(runs):
    metrics = runs["regress"].val_metrics
    assert metrics["mae"] <= 0.8 and metrics["pearson"] >= 0.85, metrics
    assert set(metrics) >= {"loss", "mae", "pearson", "acc2_nonneg", "acc2_nonzero", "acc7"}


def test_checkpoint_holds_the_head_and_eval_agrees(runs):
    ckpt = load_checkpoint(runs["classify"].checkpoint, verify=True, load_optimizer=False)
    assert tuple(ckpt.model["score.weight"].shape) == (3, 64) and "output.weight" not in ckpt.model
    config = checkpoint_config(ckpt)
    assert config.model.score_labels == 3 and config.finetune.sequence.labels == LABELS
    out = eval_labels(runs["classify"].checkpoint, runs["root"] / "cv.jsonl", roots=["/"])
    for name in ("loss", "accuracy", "macro_f1"):
        assert out[name] == pytest.approx(runs["classify"].val_metrics[name], abs=1e-5)
    reg = eval_labels(runs["regress"].checkpoint, runs["root"] / "rv.jsonl", roots=["/"])
    assert reg["mae"] == pytest.approx(runs["regress"].val_metrics["mae"], abs=1e-5)


def test_predict_labels_texts_and_files(runs, tmp_path):
    texts = ["ka lo awful mi", "lovely sa ti", "ne plain ru"]
    preds = list(predict_labels(runs["classify"].checkpoint, texts=texts))
    assert [p["label"] for p in preds] == ["neg", "pos", "neu"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    from_file = list(predict_labels(runs["classify"].checkpoint, file=tmp_path / "in.jsonl", roots=[str(tmp_path)]))
    assert from_file == preds
    values = [p["value"] for p in predict_labels(runs["regress"].checkpoint, texts=["superb ka", "dreadful lo"])]
    assert values[0] > 1.5 and values[1] < -1.5


def test_cli_eval_classify_and_predict(runs, tmp_path):
    ckpt = str(runs["classify"].checkpoint)
    result = runner.invoke(app, ["eval", "classify", "--checkpoint", ckpt, "--data", str(runs["root"] / "cv.jsonl"),
                                 "--root", "/", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] >= 0.9
    result = runner.invoke(app, ["predict", "--checkpoint", ckpt, "--text", "awful ka", "--text", "lovely lo"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["label"] for line in lines] == ["neg", "pos"]
    bad = runner.invoke(app, ["predict", "--checkpoint", ckpt, "--text", "  "])
    assert bad.exit_code == 2 and "--text #1: 'text' is empty" in bad.output and "{" not in bad.stdout


def test_trained_classifier_exports_with_equal_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from bastion.data.labelled import label_spec
    from bastion.infer.loading import load_for_inference
    from bastion.interop import export_hf
    from bastion.model.heads import sequence_scores

    out = export_hf(runs["classify"].checkpoint, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    loaded = load_for_inference(runs["classify"].checkpoint, head="score")
    cfg = loaded.config.finetune
    data = load_labelled(runs["root"] / "cv.jsonl", loaded.tokenizer, label_spec("classify", cfg.sequence), cfg, ["/"])
    batch = data.collate([[i] for i in range(16)], 64)  # right-padded to the longest of 16 texts
    ids = batch["input_ids"]
    assert (ids == data.pad_id).any()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != data.pad_id).long()).logits
        mine = sequence_scores(loaded.model, ids, data.pad_id)
    assert (theirs - mine).abs().max().item() <= 1e-5
    assert [hf.config.id2label[i] for i in theirs.argmax(-1).tolist()] == [LABELS[i] for i in mine.argmax(-1).tolist()]


def test_cli_eval_classify_reports_regression_metrics(runs, tmp_path):
    result = runner.invoke(app, ["eval", "classify", "--checkpoint", str(runs["regress"].checkpoint), "--file",
                                 str(runs["root"] / "rv.jsonl"), "--root", "/", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert set(metrics) >= {"mae", "pearson", "acc2_nonneg", "acc2_nonzero", "acc7"}
    bad = runner.invoke(app, ["eval", "classify", "--checkpoint", str(runs["regress"].checkpoint), "--file",
                              str(runs["root"] / "cv.jsonl"), "--root", "/"])  # class names where numbers belong
    assert bad.exit_code == 2 and "cv.jsonl:1: 'label' must be a number" in bad.output


def test_eval_and_predict_refuse_other_checkpoints(runs):
    with pytest.raises(CheckpointError, match="language model"):
        list(predict_labels(runs["base"], texts=["x"]))


# ---- resume --------------------------------------------------------------------------------


def test_classify_resume_is_exact(runs, tmp_path):
    kwargs = dict(max_steps=8, batch_size=4, log_every=1, eval_every=4, eval_batches=2)
    straight = train(_config(runs, "classify", tmp_path / "a", **kwargs), quiet=True)
    first = train(_config(runs, "classify", tmp_path / "b", **kwargs), quiet=True, should_stop=lambda step: step == 3)
    second = train(_config(runs, "classify", tmp_path / "b", **kwargs), resume=True, quiet=True)
    assert first.steps == 3
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    assert second.val_metrics == pytest.approx(straight.val_metrics, abs=1e-6)
    a = load_checkpoint(straight.checkpoint, load_optimizer=False).model
    b = load_checkpoint(second.checkpoint, load_optimizer=False).model
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ---- refusals ------------------------------------------------------------------------------

BAD_RECORDS = {
    "missing label": ({"text": "a b"}, "missing field 'label'"),
    "unknown label": ({"text": "a b", "label": "happy"}, "'label' 'happy' is not one of"),
    "index out of range": ({"text": "a b", "label": 3}, "'label' index 3 is outside 0..2"),
    "bool label": ({"text": "a b", "label": True}, "'label' must be a class name"),
    "float label": ({"text": "a b", "label": 1.0}, "'label' must be a class name"),
    "missing text": ({"label": "neg"}, "missing field 'text'"),
    "empty text": ({"text": "  ", "label": "neg"}, "'text' is empty"),
    "text not a string": ({"text": ["a"], "label": "neg"}, "'text' must be a string"),
    "unknown key": ({"text": "a", "label": "neg", "features": [1]}, "unknown field(s) 'features'"),
    "not an object": (["a", "neg"], "record must be a JSON object"),
}
BAD_VALUES = {
    "string value": ({"text": "a", "label": "1.5"}, "'label' must be a number"),
    "nan": ('{"text": "a", "label": NaN}', "'label' must be a finite number"),
    "infinity": ('{"text": "a", "label": Infinity}', "'label' must be a finite number"),
    "out of range": ({"text": "a", "label": 3.5}, "'label' 3.5 is outside finetune.sequence.label_range [-3, 3]"),
    "bool": ({"text": "a", "label": False}, "'label' must be a number"),
    "huge integer": ('{"text": "a", "label": ' + "9" * 400 + "}", "'label' must be a finite number"),
    "huge": ({"text": "a", "label": 1e12}, "'label' 1e+12 is beyond +-1e+09"),
}


def _load(runs, path, spec, **ft):
    cfg = build_config({}).finetune.model_copy(update={"max_length": 64, **ft})
    from bastion.checkpoint.contents import checkpoint_tokenizer

    tok = checkpoint_tokenizer(load_checkpoint(runs["base"], load_optimizer=False))
    return load_labelled(path, tok, spec, cfg, ["/"])


def _write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_classify_records_name_file_line_and_field(runs, tmp_path, case):
    record, message = BAD_RECORDS[case]
    path = _write_lines(tmp_path / "bad.jsonl", [{"text": "fine", "label": "pos"}, record])
    with pytest.raises(DataError) as info:
        _load(runs, path, LabelSpec("classify", names=tuple(LABELS)))
    assert f"{path}:2: " in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_regress_records_name_file_line_and_field(runs, tmp_path, case):
    record, message = BAD_VALUES[case]
    path = _write_lines(tmp_path / "bad.jsonl", [{"text": "fine", "label": 0.5}, record])
    with pytest.raises(DataError) as info:
        _load(runs, path, LabelSpec("regress", bounds=(-3.0, 3.0)))
    assert f"{path}:2: " in str(info.value) and message in str(info.value)


def test_oversize_lines_and_files_are_refused(runs, tmp_path, monkeypatch):
    path = _write_lines(tmp_path / "big.jsonl", [{"text": "x " * 600, "label": "neg"}])
    with pytest.raises(DataError, match="max_file_bytes"):
        _load(runs, path, LabelSpec("classify", names=tuple(LABELS)), max_file_bytes=1000)
    monkeypatch.setattr("bastion.data.finetune.MAX_RECORD_BYTES", 512)
    with pytest.raises(DataError, match="record limit"):
        _load(runs, path, LabelSpec("classify", names=tuple(LABELS)))


def test_hostile_lines_are_refused_with_their_line(runs, tmp_path):
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "neg"}\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
                     + b'\xff\xfe not utf-8\n{"text": "a", "label": "neg"}\n')
    with pytest.raises(DataError) as info:
        _load(runs, path, LabelSpec("classify", names=tuple(LABELS)))
    message = str(info.value)
    assert "2 invalid record(s)" in message
    assert f"{path}:2: " in message and f"{path}:3: not valid UTF-8" in message


def test_long_texts_keep_their_first_tokens(runs, tmp_path):
    path = _write_lines(tmp_path / "long.jsonl", [{"text": "ka lo " * 100, "label": 1}, {"text": "mi", "label": 0}])
    data = _load(runs, path, LabelSpec("classify", names=tuple(LABELS)), max_length=16)
    assert data.max_length == 16 and data.truncated == 1 and data.labels.tolist() == [1, 0]


def test_bad_data_fails_before_anything_is_written(runs, tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [{"text": "a", "label": "neg"}, {"text": "b", "label": "maybe"}])
    cfg = finetune_config(runs["base"], path, tmp_path / "run", objective="classify", sequence={"labels": LABELS},
                          seq_len=64)
    with pytest.raises(DataError, match=":2: 'label' 'maybe'"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sequence, objective, message", [
    (None, "classify", "needs finetune.sequence.labels"),
    ({"labels": ["a"]}, "classify", "at least 2"),
    ({"labels": ["a", "a"]}, "classify", "distinct"),
    ({"labels": ["a", "b"]}, "regress", "finetune.sequence.labels is for train.objective classify"),
    ({"label_range": [1, -1]}, "regress", "finite low < high"),
    ({"label_range": [-1, 1]}, "classify", "label_range is for train.objective regress"),
    ({"regress_loss": "hinge"}, "regress", "regress_loss"),
])
def test_config_refusals(runs, tmp_path, sequence, objective, message):
    if objective == "classify" and sequence is not None and "labels" not in sequence:
        sequence = {**sequence, "labels": LABELS}
    with pytest.raises(ConfigError, match=message):
        finetune_config(runs["base"], tmp_path / "x.jsonl", tmp_path / "run", objective=objective, sequence=sequence)


def test_a_mismatched_head_is_refused(runs, tmp_path):  # LoRA runs: tests/train/test_classify_lora.py
    more = finetune_config(runs["classify"].checkpoint, runs["root"] / "c.jsonl", tmp_path / "more",
                           objective="classify", sequence={"labels": ["a", "b"]}, seq_len=64)
    with pytest.raises(CheckpointError, match="scores 3 labels"):
        train(more, quiet=True)


def test_huber_and_l1_losses_train(runs, tmp_path):
    for loss in ("l1", "huber"):
        result = train(_config(runs, "regress", tmp_path / loss, max_steps=2, batch_size=4,
                               sequence={"regress_loss": loss}), quiet=True)
        assert all(math.isfinite(x) for x in result.losses)


# ---- metrics -------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    out = classification_metrics(scores, labels)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0: tp1 fp1 fn1 -> 0.5; 1: tp2 fp1 fn0 -> 0.8; 2: tp1 fp0 fn1 -> 2/3
    assert out["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(np.array([0, 0]), np.array([0, 0])) == 1.0  # absent classes are left out


def test_regression_metrics_by_hand():
    labels = np.array([-2.6, -0.4, 0.0, 1.2, 3.0])
    predicted = np.array([-3.4, 0.3, 0.2, 0.6, 2.4])
    out = regression_metrics(predicted, labels)
    assert out["mae"] == pytest.approx(np.mean([0.8, 0.7, 0.2, 0.6, 0.6]))
    assert out["pearson"] == pytest.approx(np.corrcoef(predicted, labels)[0, 1])
    # non-negative: labels [F F T T T], predictions [F T T T T] -> 4/5
    assert out["acc2_nonneg"] == pytest.approx(4 / 5)
    # label 0 left out: labels [-, -, +, +] vs predictions [-, +, +, +] -> 3/4
    assert out["acc2_nonzero"] == pytest.approx(3 / 4)
    # round(clip): labels [-3, -0, 0, 1, 3], predictions [-3, 0, 0, 1, 2] -> 4/5
    assert out["acc7"] == pytest.approx(4 / 5)
    assert regression_metrics(np.ones(3), np.array([1.0, 2.0, 3.0]))["pearson"] == 0.0
