"""train.objective classify with finetune.sequence.modalities, through the real loop: a text model
gains gated cross-modal fusion (bastion/model/fusion.py), trains on the synthetic multimodal
sets in the on-disk layout (tests/synthetic/multimodal.py), and proves it uses the stream that
decides the label: removing it at evaluation (`bastion eval classify --without`) drops accuracy
to chance. Also: checkpoints hold the fusion, resume is exact, predict reads the streams,
missing modalities train and predict, export to transformers is refused, and bad data or
config is refused before anything is written."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import finetune_config, make_base_checkpoint
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import checkpoint_config
from bastion.cli import app
from bastion.errors import CheckpointError, ConfigError, DataError
from bastion.eval.classify import eval_labels, predict_labels
from bastion.interop.hf import export_hf
from bastion.train.loop import train
from synthetic.multimodal import FEATURES, LABELS, write_multimodal_split

MAX_FRAMES = 12
MODALITIES = {m: {"features": size, "max_frames": MAX_FRAMES} for m, size in FEATURES.items()}
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion-train")
    base = make_base_checkpoint(root / "base", d_model=32, n_layer=1)
    out = {"root": root, "base": base}
    # audio decides; the visual noise stream is missing for ~30% of examples (train and predict
    # with a missing modality), and modality dropout drops either stream while training
    write_multimodal_split(root / "audio", "train", 320, "audio", seed=5, max_frames=MAX_FRAMES,
                           missing={"visual": 0.3})
    write_multimodal_split(root / "audio", "val", 160, "audio", seed=5, max_frames=MAX_FRAMES, missing={"visual": 0.3})
    out["audio"] = train(_config(out, "audio", root / "run-audio", sequence={"modality_dropout": 0.1}), quiet=True)
    return out


def _config(runs, source, out_dir, *, modalities=MODALITIES, **settings):
    data = runs["root"] / source
    settings = {"seq_len": 64, "batch_size": 32, "max_steps": 60, "lr": 3e-3, "warmup_steps": 5, "eval_every": 1000,
                "eval_batches": 8, **settings}
    sequence = {"labels": LABELS, "modalities": modalities, **settings.pop("sequence", {})}
    return finetune_config(runs["base"], data / "train.jsonl", out_dir, objective="classify",
                           val_file=data / "val.jsonl", sequence=sequence, **settings)


def _val(runs, source="audio"):
    return runs["root"] / source / "val.jsonl"


# ---- learning and ablation -----------------------------------------------------------------------


def test_fused_classifier_learns_the_audio_stream_and_needs_it(runs):
    result = runs["audio"]
    assert result.val_metrics["accuracy"] >= 0.9, result.val_metrics
    ckpt = result.checkpoint
    assert eval_labels(ckpt, _val(runs), roots=["/"])["accuracy"] == pytest.approx(result.val_metrics["accuracy"])
    without_audio = eval_labels(ckpt, _val(runs), roots=["/"], without=["audio"])["accuracy"]
    without_visual = eval_labels(ckpt, _val(runs), roots=["/"], without=["visual"])["accuracy"]
    assert 0.35 <= without_audio <= 0.65, without_audio  # the deciding stream removed: chance
    assert without_visual >= 0.85, without_visual  # the noise stream removed: nothing lost


def test_checkpoint_holds_the_fusion_and_its_declaration(runs):
    ckpt = load_checkpoint(runs["audio"].checkpoint, load_optimizer=False)
    config = checkpoint_config(ckpt)
    assert {m: (s.features, s.max_frames) for m, s in config.model.modalities.items()} == {
        m: (size, MAX_FRAMES) for m, size in FEATURES.items()}
    assert config.model.score_labels == 2
    names = set(ckpt.model)
    assert {"fusion.streams.audio.proj.weight", "fusion.streams.visual.attend.in_proj_weight", "score.weight"} <= names
    assert "output.weight" not in names


def test_predict_reads_the_streams_and_names_each_example(runs, tmp_path):
    from safetensors import safe_open

    val = _val(runs)
    records = [json.loads(line) for line in val.read_text().splitlines()]
    predictions = list(predict_labels(runs["audio"].checkpoint, file=val, roots=["/"]))
    assert [p["id"] for p in predictions] == [r["id"] for r in records]
    with safe_open(str(val.with_name("val.visual.safetensors")), "pt") as f:
        has_visual = set(f.keys())
    lacking = [i for i, r in enumerate(records) if r["id"] not in has_visual]
    assert 20 <= len(lacking) <= 80  # the missing modality is really exercised
    for rows in (lacking, [i for i in range(len(records)) if i not in lacking]):
        correct = sum(predictions[i]["label"] == records[i]["label"] for i in rows)
        assert correct / len(rows) >= 0.85, (len(rows), correct)
    # a text alone has no streams: answered (every modality missing), at chance on this set
    alone = list(predict_labels(runs["audio"].checkpoint, texts=[records[0]["text"]]))
    assert set(alone[0]) == {"label", "probabilities"}


def test_cli_eval_without_and_predict(runs, tmp_path):
    ckpt = str(runs["audio"].checkpoint)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", "classify", "--checkpoint", ckpt, "--file", str(_val(runs)), "--root", "/",
                                 "--without", "audio", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert 0.35 <= json.loads(out.read_text())["accuracy"] <= 0.65
    result = runner.invoke(app, ["eval", "classify", "--checkpoint", ckpt, "--file", str(_val(runs)), "--root", "/",
                                 "--without", "smell"])
    assert result.exit_code == 2 and "not a modality of this model" in result.output
    result = runner.invoke(app, ["predict", "--checkpoint", ckpt, "--file", str(_val(runs)), "--root", "/"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["id"] == "val_00000" and set(first["probabilities"]) == set(LABELS)


def test_export_to_transformers_is_refused(runs, tmp_path):
    with pytest.raises(CheckpointError, match="fuses feature streams .* stays a verified Bastion checkpoint"):
        export_hf(runs["audio"].checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_text_decides_and_the_streams_add_nothing(runs, tmp_path):
    for split, n in (("train", 320), ("val", 160)):
        write_multimodal_split(runs["root"] / "text", split, n, "text", seed=5, max_frames=MAX_FRAMES)
    result = train(_config(runs, "text", tmp_path / "run"), quiet=True)
    assert result.val_metrics["accuracy"] >= 0.9, result.val_metrics
    both_gone = eval_labels(result.checkpoint, _val(runs, "text"), roots=["/"], without=["audio", "visual"])
    assert both_gone["accuracy"] >= 0.85, both_gone


def test_the_interaction_needs_both_streams(runs, tmp_path):
    data = runs["root"] / "av"
    write_multimodal_split(data, "train", 480, "audio_visual", seed=5, max_frames=MAX_FRAMES)
    write_multimodal_split(data, "val", 200, "audio_visual", seed=5, max_frames=MAX_FRAMES)
    result = train(_config(runs, "av", tmp_path / "run", max_steps=250), quiet=True)
    assert result.val_metrics["accuracy"] >= 0.85, result.val_metrics
    for gone in FEATURES:
        acc = eval_labels(result.checkpoint, data / "val.jsonl", roots=["/"], without=[gone])["accuracy"]
        assert 0.35 <= acc <= 0.65, (gone, acc)


def test_missing_modalities_train_and_predict(runs, tmp_path):
    data = runs["root"] / "missing"
    write_multimodal_split(data, "train", 320, "audio", seed=5, max_frames=MAX_FRAMES, missing=0.3)
    write_multimodal_split(data, "val", 160, "audio", seed=5, max_frames=MAX_FRAMES, missing=0.3)
    result = train(_config(runs, "missing", tmp_path / "run", max_steps=80,
                           sequence={"modality_dropout": 0.2}), quiet=True)
    assert 0.7 <= result.val_metrics["accuracy"], result.val_metrics  # ~30% lack audio: at chance there
    predictions = list(predict_labels(result.checkpoint, file=data / "val.jsonl", roots=["/"]))
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in predictions)


# ---- resume ------------------------------------------------------------------------------------


def test_fused_resume_is_exact_with_modality_dropout(runs, tmp_path):
    kwargs = dict(max_steps=6, batch_size=8, log_every=1, eval_every=3, eval_batches=2,
                  sequence={"modality_dropout": 0.3})
    straight = train(_config(runs, "audio", tmp_path / "a", **kwargs), quiet=True)
    first = train(_config(runs, "audio", tmp_path / "b", **kwargs), quiet=True, should_stop=lambda step: step == 2)
    second = train(_config(runs, "audio", tmp_path / "b", **kwargs), resume=True, quiet=True)
    assert first.steps == 2
    assert first.losses + second.losses == pytest.approx(straight.losses, abs=1e-6)
    a = load_checkpoint(straight.checkpoint, load_optimizer=False).model
    b = load_checkpoint(second.checkpoint, load_optimizer=False).model
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_continuing_a_fused_checkpoint_needs_the_same_streams(runs, tmp_path):
    fused = runs["audio"].checkpoint
    again = _config(runs, "audio", tmp_path / "again", max_steps=2)
    again = again.model_copy(update={"finetune": again.finetune.model_copy(update={"init_from": str(fused)})})
    assert train(again, quiet=True).steps == 2
    other = _config(runs, "audio", tmp_path / "other", max_steps=2, modalities={"audio": MODALITIES["audio"]})
    other = other.model_copy(update={"finetune": other.finetune.model_copy(update={"init_from": str(fused)})})
    with pytest.raises(CheckpointError, match=r"fuses modalities audio \(8 x 12\), visual .* declares audio \(8 x 12\)"):
        train(other, quiet=True)


# ---- refusals ------------------------------------------------------------------------------------


def _rewrite(folder, change):
    path = folder / "train.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    change(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("case, change, message", [
    ("no id", lambda rs: rs[3].pop("id"), r"train.jsonl:4: missing field 'id'"),
    ("repeated id", lambda rs: rs[5].update(id=rs[2]["id"]), r"train.jsonl:6: 'id' 'train_00002' is used by an earlier"),
    ("id not a string", lambda rs: rs[0].update(id=7), r"train.jsonl:1: 'id' must be a string"),
])
def test_bad_ids_are_refused_before_anything_is_written(runs, tmp_path, case, change, message):
    data = tmp_path / "bad"
    write_multimodal_split(data, "train", 16, "audio", seed=5, max_frames=MAX_FRAMES)
    _rewrite(data, change)
    cfg = _config(runs, "audio", tmp_path / "out", max_steps=2)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"train_file": str(data / "train.jsonl"),
                                                                             "val_file": None})})
    with pytest.raises(DataError, match=message):
        train(cfg, quiet=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_wrong_feature_file_names_example_and_modality(runs, tmp_path):
    from safetensors.torch import save_file

    data = tmp_path / "bad"
    write_multimodal_split(data, "train", 16, "audio", seed=5, max_frames=MAX_FRAMES)
    save_file({"train_00001": torch.zeros(3, FEATURES["visual"] + 1)}, str(data / "train.visual.safetensors"))
    cfg = _config(runs, "audio", tmp_path / "out", max_steps=2)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"train_file": str(data / "train.jsonl"),
                                                                             "val_file": None})})
    with pytest.raises(DataError, match=r"example 'train_00001', modality 'visual': has 7 features per frame"):
        train(cfg, quiet=True)


def test_lora_with_modalities_is_refused(runs, tmp_path):
    cfg = _config(runs, "audio", tmp_path / "out", max_steps=2)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(
        update={"lora": cfg.finetune.lora.model_copy(update={"enabled": True})})})
    with pytest.raises(ConfigError, match="finetune.lora.enabled: a model with finetune.sequence.modalities trains"):
        train(cfg, quiet=True)


def test_a_fused_checkpoint_is_refused_as_text_only(runs, tmp_path):
    cfg = _config(runs, "audio", tmp_path / "out", max_steps=2, modalities={})
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"init_from": str(runs["audio"].checkpoint)})})
    with pytest.raises(CheckpointError, match="declares none"):
        train(cfg, quiet=True)
